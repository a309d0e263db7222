"""The ``layertrack`` command line: every command, option, unit and default.

The names of metrics, webhook events, phases and the scoring defaults come from
``layertrack.workers.vocabulary``, the one place they are defined.
"""

from __future__ import annotations

import argparse
import os
import sys

from layertrack.workers.checkpoint import DTYPES  # stdlib only: no torch
from layertrack.workers.vocabulary import (
    CHECKPOINT_FORMATS,
    DEFAULT_HOLDOUT_TOKENS,
    DEFAULT_METRIC,
    DEFAULT_MIN_TOKENS,
    DEFAULT_PROBE,
    DEFAULT_SEQ_LEN,
    KNOWN_METRICS,
    WARN_TOKENS_PER_DIM,
    WEBHOOK_EVENTS,
    AlertKind,
    JobStatus,
    Phase,
)

from . import admin, local, remote, series, up
from .common import EXIT_USAGE, one_line

DEFAULT_PORT = 8321


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line that says where the help is."""

    def error(self, message: str):
        print(f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def job_limit(text: str) -> int:
    value = positive_int(text)
    if value > 1000:
        raise argparse.ArgumentTypeError(f"the service lists at most 1000 jobs at a time, not {value}")
    return value


def seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def seconds_or_zero(text: str) -> float:
    """Zero or a positive number of seconds."""
    if text.strip() in ("0", "0.0"):
        return 0.0
    return seconds(text)


def at_least_two(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("the first and the last step are always taken: give at least 2")
    return value


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1 to 65535, not {value}")
    return value


def scope_list(text: str) -> str:
    """A ``--scope`` value: read, submit or admin, or several comma separated."""
    from ..auth import SCOPES, parse_scopes  # sqlalchemy: only when the option is given

    if not text.strip(" ,"):
        raise argparse.ArgumentTypeError(f"give a scope: {', '.join(SCOPES)}")
    try:
        parse_scopes([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _group(sub, name: str, help: str) -> argparse._SubParsersAction:
    """A command with actions of its own (``token create``); alone, it prints its help."""
    parser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(help_parser=parser)
    return parser.add_subparsers(dest=f"{name}_action", metavar="ACTION", title="actions")


def _add_series(sub) -> None:
    """watch and backfill (service/cli/series.py)."""
    listed_here = ("LOCATION is listed on THIS machine (where the command runs), with the store libraries "
                   "installed here (pip install 'layertrack[s3]', [gcs], [azure] or [hub]) and this machine's "
                   "credentials (AWS_*, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*, "
                   "HF_TOKEN, HF_ENDPOINT); the service's workers read each checkpoint with theirs.")
    names = ("A checkpoint is a directory named with its step: checkpoint-1000/, step_2000/, global_step3000/, "
             "iter_0004000/ (or --step-pattern).")
    watch = sub.add_parser(
        "watch", help="submit each new complete checkpoint that appears under a directory or remote prefix",
        description="Look at LOCATION (a local directory, s3://bucket/prefix/, gs://..., az://..., or a Hub "
                    "repository with --revisions) every --interval seconds and submit each new COMPLETE "
                    "checkpoint once, printing run, step, URI and job id. " + names + " A checkpoint still "
                    "being written (config.json or the weights missing, the index naming a shard not there yet, a "
                    "local safetensors file still short, files changing within --settle seconds) is submitted "
                    "once it is complete. What was submitted is kept in a state file, so a restarted watch does "
                    "not submit again (and the service answers a resubmitted checkpoint with its existing job). "
                    "Local directories are submitted as absolute paths. " + listed_here + " Ctrl-C or SIGTERM stops it "
                    "(exit 0), also when it was started as a background job with SIGINT ignored.")
    backfill = sub.add_parser(
        "backfill", help="submit an existing series of checkpoints (a directory, a prefix, Hub revisions) in "
                         "step order",
        description="Submit, in step order, every checkpoint directory under LOCATION (a local directory, "
                    "s3://..., gs://..., az://..., hf://org/repo), or with --revisions every branch or tag of a Hub "
                    "repository whose name matches (hf://org/repo@NAME, the step parsed from the name, e.g. "
                    "Pythia's step1000). " + names + " Incomplete checkpoints are left out (said on stderr). "
                    + listed_here)
    for p in (watch, backfill):
        p.add_argument("location", metavar="LOCATION",
                       help="a directory, s3://bucket/prefix/, gs://bucket/prefix/, az://container/prefix/ or "
                            "hf://org/repo[@revision][/subfolder], listed on this machine")
        p.add_argument("--run", required=True, help="the run the checkpoints are submitted to")
        p.add_argument("--step-pattern", type=series.step_pattern, metavar="REGEX",
                       help="a regular expression that must match the whole directory (or revision) name, with a "
                            "group 'step' or a first group for the step, e.g. 'run7-(?P<step>[0-9]+)k' (default: "
                            "directories named checkpoint-N, checkpoint_N, stepN, step_N, step-N, global_stepN, "
                            "iter_N, ckpt-N; revisions whose names hold such a part, e.g. step1000, "
                            "step1000-tokens4B, stage1-step1000-tokens4B)")
        p.add_argument("--revisions", metavar="GLOB",
                       help="hf://org/repo only: take the repository's branches and tags whose names match this "
                            "fnmatch pattern, e.g. 'step*' (default: the checkpoint directories in the repository)")
        add_submission_options(p)
    watch.add_argument("--interval", type=seconds, default=series.DEFAULT_INTERVAL_S, metavar="SECONDS",
                       help=f"seconds between two looks (default: {series.DEFAULT_INTERVAL_S:g})")
    watch.add_argument("--once", action="store_true",
                       help="look once, submit what is complete, and exit (for cron; default: keep watching)")
    watch.add_argument("--settle", type=seconds_or_zero, default=series.DEFAULT_SETTLE_S, metavar="SECONDS",
                       help="local directories: a complete checkpoint is looked at again after this many seconds "
                            "and submitted only if none of its files changed (0: no second look; default: "
                            f"{series.DEFAULT_SETTLE_S:g})")
    watch.add_argument("--state", metavar="FILE",
                       help="where the submitted checkpoints are remembered across restarts (default: "
                            "<data dir>/watch/<run>-<hash of service, run, location and options>.json)")
    watch.set_defaults(func=series.cmd_watch)
    subset = backfill.add_mutually_exclusive_group()
    subset.add_argument("--every", type=positive_int, metavar="K",
                        help="take every K-th checkpoint in step order, starting with the first (default: all)")
    subset.add_argument("--log-spaced", type=at_least_two, metavar="N",
                        help="take N checkpoints spread log-uniformly over the steps, the first and the last "
                             "kept (default: all)")
    backfill.add_argument("--dry-run", action="store_true",
                          help="print what would be submitted (step, URI), one per line, and submit nothing")
    backfill.set_defaults(func=series.cmd_backfill)


def _absolute(value: str) -> str:
    """A local path as an absolute one (the service resolves it, not this directory)."""
    return os.path.abspath(os.path.expanduser(value)) if "://" not in value else value


def add_submission_options(p: argparse.ArgumentParser) -> None:
    """The options of a submission: submit, watch and backfill take the same."""
    p.add_argument("--phase", choices=tuple(ph.value for ph in Phase),
                   help="the checkpoint's phase (default: the run's; a new run's is finetune when it has a "
                        "parent, else pretrain)")
    p.add_argument("--parent-run", metavar="RUN", help="the run a fine-tune starts from")
    p.add_argument("--parent-step", type=int, metavar="STEP", help="the parent run's step it starts from")
    p.add_argument("--probe", metavar="NAME", help=f"probe the service scores with (default: {DEFAULT_PROBE})")
    p.add_argument("--max-tokens", type=positive_int, metavar="N",
                   help=f"probe tokens to score (default: max({DEFAULT_MIN_TOKENS}, "
                        f"{WARN_TOKENS_PER_DIM:g}·d), capped by the probe)")
    p.add_argument("--seq-len", type=positive_int, metavar="N",
                   help=f"tokens per sequence (default: {DEFAULT_SEQ_LEN})")
    p.add_argument("--drop-first-token", action="store_true",
                   help="do not score the first token of each sequence (attention sink)")
    p.add_argument("--dtype", choices=DTYPES, help="model dtype (default: the worker's device default)")
    p.add_argument("--replaceability", action="store_true",
                   help="also store loss_delta_linear and loss_delta_drop per block (nats/token; 2 extra "
                        "passes over the held-out tokens per block)")
    p.add_argument("--holdout-tokens", type=positive_int, metavar="N",
                   help=f"held-out probe tokens for --replaceability (default: {DEFAULT_HOLDOUT_TOKENS})")
    p.add_argument("--logit-lens", action="store_true",
                   help="also store logit_lens_loss per hidden state (nats/token; one decode through the final "
                        "norm and the LM head per hidden state and batch; resident models only)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model.bin weights (loaded with weights_only=True; default: refused)")
    p.add_argument("--format", choices=CHECKPOINT_FORMATS,
                   help="the checkpoint's layout (default: detected by the service): hf, nanogpt (ckpt.pt), dcp "
                        "(.metadata + .distcp), torchtitan (its step-N/ DCP directory), litgpt (lit_model.pth + "
                        "model_config.yaml)")
    p.add_argument("--model-config", metavar="FILE|DIR", type=_absolute,
                   help="a transformers config.json (or its directory) under the service's checkpoint roots, for "
                        "a checkpoint that carries no architecture (dcp, torchtitan)")
    p.add_argument("--tokenizer", metavar="DIR", type=_absolute,
                   help="a tokenizer directory under the checkpoint roots, for a checkpoint saved without one")
    p.add_argument("--dynamics", action=argparse.BooleanOptionalAction, default=None,
                   help="measure weight_update per block and drift_cka per hidden state against the run's previous "
                        "scored checkpoint (default: when that checkpoint is on a local path; --no-dynamics: never)")
    p.add_argument("--compare-to", metavar="STEP|PATH", type=_step_or_path,
                   help="compare with this step of the run, or the checkpoint at this path (under the service's "
                        "checkpoint roots), instead of the run's previous scored step")


def _step_or_path(text: str) -> int | str:
    """``--compare-to`` of a submission: a step (digits) or a local path (made absolute here)."""
    return int(text) if text.isdigit() else _absolute(text)


def build_parser() -> argparse.ArgumentParser:
    from layertrack.service.demo.training import PLANS  # plain data: no torch

    parser = Parser(
        prog="layertrack",
        description="Track how the layers of a transformer language model change while it trains.",
        epilog="'layertrack COMMAND --help' describes a command. Service commands find the service at "
               "LAYERTRACK_URL with LAYERTRACK_TOKEN, else where 'layertrack up' saved them.",
    )
    parser.set_defaults(help_parser=parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    # ---------------------------------------------------------------- local scoring
    score = sub.add_parser(
        "score",
        help="score every layer of one checkpoint on the probe text and print the table",
        description=(
            "Load a Hugging Face causal-LM checkpoint directory (safetensors), run the probe "
            "text through it once, and print per-layer linearity, residual-removed linearity, "
            "cosine, norm ratio and anisotropy. Runs here, without the service (needs the worker extra)."
        ),
    )
    score.add_argument("checkpoint", metavar="PATH_OR_URI",
                       help="checkpoint directory or file:// URI (a transformers save, nanoGPT's out dir, "
                            "a DCP step dir)")
    score.add_argument("--probe", metavar="FILE", help="probe text, a UTF-8 .txt or .jsonl file (default: built-in)")
    score.add_argument("--max-tokens", type=positive_int, metavar="N",
                       help=f"probe tokens to score (default: max({DEFAULT_MIN_TOKENS}, "
                            f"{WARN_TOKENS_PER_DIM:g}·d), capped by the probe)")
    score.add_argument("--seq-len", type=positive_int, default=DEFAULT_SEQ_LEN, metavar="N",
                       help=f"tokens per sequence (default: {DEFAULT_SEQ_LEN})")
    score.add_argument("--batch-size", type=positive_int, metavar="N",
                       help="sequences per forward pass (default: 1024 tokens' worth on CPU, 16384 on CUDA)")
    score.add_argument("--dtype", choices=DTYPES, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    score.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present, else cpu)")
    score.add_argument("--drop-first-token", action="store_true",
                       help="do not score the first token of each sequence (attention sink)")
    score.add_argument("--tokenizer", metavar="DIR",
                       help="tokenizer directory, for a checkpoint saved without one (default: the checkpoint's)")
    score.add_argument("--format", choices=CHECKPOINT_FORMATS,
                       help="the checkpoint's layout (default: detected): hf (config.json + safetensors), nanogpt "
                            "(ckpt.pt), dcp (torch.distributed.checkpoint .metadata + .distcp: the model under "
                            "'model.' in transformers names, or torchtitan's names), torchtitan (its step-N/), litgpt "
                            "(lit_model.pth + model_config.yaml)")
    score.add_argument("--model-config", metavar="FILE|DIR",
                       help="the transformers config.json of the architecture, for a checkpoint that carries none "
                            "(dcp, torchtitan) or to use instead of the one it carries")
    score.add_argument("--allow-pickle", action="store_true",
                       help="allow pytorch_model.bin weights (loaded with weights_only=True; default: refused)")
    score.add_argument("--seed", type=int, default=0, help="seed of the probe's document order (default: 0)")
    score.add_argument("--replaceability", action="store_true",
                       help="also measure, per block, the held-out LM loss change (nats/token) when the block is "
                            "replaced by its fitted linear map and when it is dropped (2 extra passes per block)")
    score.add_argument("--holdout-tokens", type=positive_int, default=DEFAULT_HOLDOUT_TOKENS, metavar="N",
                       help=f"held-out probe tokens for --replaceability (default: {DEFAULT_HOLDOUT_TOKENS})")
    score.add_argument("--logit-lens", action="store_true",
                       help="also measure logit_lens_loss per hidden state: the next-token cross-entropy (nats/token) "
                            "of h_i decoded through the final norm and the LM head (resident models only)")
    score.add_argument("--compare-to", metavar="DIR",
                       help="an earlier checkpoint of the same model: also measure weight_update per block, "
                            "‖W − W_prev‖ / ‖W_prev‖, and drift_cka per hidden state (default: none)")
    score.add_argument("--dynamics", action=argparse.BooleanOptionalAction, default=None,
                       help="with --compare-to: measure weight_update (default: yes); --no-dynamics: do not")
    score.add_argument("--max-memory", type=local.size, metavar="SIZE",
                       help="memory for weights and activations, e.g. 8GiB or 512MB (default: LAYERTRACK_MAX_MEMORY, "
                            "else 80%% of the free memory); a model that does not fit is streamed block by block")
    score.add_argument("--plan", action="store_true",
                       help="print the memory plan (resident or streamed, passes, predicted peak) and exit "
                            "without scoring")
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=local.cmd_score)

    # ---------------------------------------------------------------- the service
    up_ = sub.add_parser(
        "up", help="start the API and its workers on this machine (SQLite and a file broker by default)",
        description="Migrate the database, create a first API token (saved where the CLI finds it), start a "
                    "scoring worker and a webhook worker, and serve the API until Ctrl-C or SIGTERM (exit 0; also when "
                    "started as a background job with SIGINT ignored).",
    )
    up_.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    up_.add_argument("--port", type=port, default=DEFAULT_PORT,
                     help=f"TCP port to listen on (default: {DEFAULT_PORT})")
    up_.add_argument("--roots", nargs="+", metavar="DIR_OR_PREFIX",
                     help="checkpoint roots: the directories and remote prefixes (s3://bucket/runs/, gs://..., "
                          "az://..., hf://org/, https://host/ckpts/) checkpoints may be read from, for the API and "
                          "the workers (default: LAYERTRACK_CHECKPOINT_ROOTS, else the working directory)")
    up_.add_argument("--data-dir", metavar="DIR",
                     help="the data directory: SQLite database, file broker, client.json with the token, logs "
                          "(default: LAYERTRACK_DATA_DIR, else ~/.local/share/layertrack); 'layertrack demo' "
                          "keeps its service's in OUT/service")
    up_.add_argument("--no-worker", action="store_true", help="start only the API (default: API and workers)")
    up_.set_defaults(func=up.cmd_up)

    submit = sub.add_parser(
        "submit", help="submit a checkpoint to the service for scoring",
        description="Queue a checkpoint for scoring. A relative path is made absolute here; the service must "
                    "be able to read it (it lies under the service's checkpoint roots).",
    )
    submit.add_argument("run", help="run name")
    submit.add_argument("step", type=int, help="training step")
    submit.add_argument("uri", metavar="PATH_OR_URI",
                        help="checkpoint directory, file:// URI, or a remote one the service's workers fetch: "
                             "s3://bucket/prefix/, gs://..., az://..., hf://org/repo[@revision][/subfolder], "
                             "https://host/path/ (within the service's allowed prefixes)")
    add_submission_options(submit)
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish; exit 0 if it succeeded")
    submit.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="with --wait: give up after this many seconds (default: 3600)")
    submit.set_defaults(func=remote.cmd_submit)

    status = sub.add_parser("status", help="show a job", description="Show a job's status, worker, duration, error.")
    status.add_argument("job_id", help="the job's id (printed by submit)")
    status.set_defaults(func=remote.cmd_status)

    wait = sub.add_parser("wait", help="wait until a job has finished; exit 0 if it succeeded")
    wait.add_argument("job_id", help="the job's id (printed by submit)")
    wait.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                      help="give up after this many seconds (default: 3600)")
    wait.set_defaults(func=remote.cmd_wait)

    jobs = sub.add_parser(
        "jobs", help="list jobs, newest first (of one run, in one status)",
        description="List jobs, newest first: id, status, step, when queued, duration, worker, run and the error "
                    "code of a failed one. A token with only the submit scope sees the jobs it submitted.")
    jobs.add_argument("--run", metavar="RUN", help="only this run's jobs (default: every run)")
    jobs.add_argument("--status", choices=tuple(st.value for st in JobStatus),
                      help="only jobs in this status (default: any)")
    jobs.add_argument("--limit", type=job_limit, default=100, metavar="N",
                      help="at most this many, 1 to 1000 (default: 100)")
    jobs.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    jobs.set_defaults(func=remote.cmd_jobs)

    cancel = sub.add_parser(
        "cancel", help="cancel a queued or running job",
        description="Cancel a queued or running job (a running job's worker discards its result). Needs the submit "
                    "scope, and admin for a job another token submitted.")
    cancel.add_argument("job_id", help="the job's id (from submit or 'layertrack jobs')")
    cancel.set_defaults(func=remote.cmd_cancel)

    retry = sub.add_parser(
        "retry", help="queue a failed or cancelled job again",
        description="Queue a failed or cancelled job again; it keeps its id. Needs the submit scope, and admin for a "
                    "job another token submitted.")
    retry.add_argument("job_id", help="the job's id (from submit or 'layertrack jobs')")
    retry.set_defaults(func=remote.cmd_retry)

    runs = sub.add_parser(
        "runs", help="list runs (phase, last step, checkpoints, jobs by status, last activity)",
        description="List runs, oldest first: phase, last step, checkpoints, job counts by status, last activity, "
                    "and the parent of a fine-tune.")
    runs.add_argument("--name", metavar="TEXT", help="only runs whose name contains TEXT (default: every run)")
    runs.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    runs.set_defaults(func=remote.cmd_runs)
    runs_actions = runs.add_subparsers(dest="runs_action", metavar="ACTION", title="actions")
    rd = runs_actions.add_parser(
        "delete", help="delete a run and what belongs only to it (admin scope; asks for --yes)",
        description="Delete a run with its checkpoints, jobs and scores, its alert rules and their firings, and the "
                    "webhook subscriptions limited to it (with their deliveries). Webhooks of every run, their "
                    "delivery logs and the run's fine-tunes (which lose their parent) stay. A run with queued or "
                    "running jobs is not deleted: cancel them first. Without --yes, nothing is deleted: the command "
                    "says what would be, and exits 2. Needs a token with the admin scope.")
    rd.add_argument("run", help="run name")
    rd.add_argument("--yes", action="store_true", help="really delete it (default: only say what would be deleted)")
    rd.set_defaults(func=remote.cmd_runs_delete)

    trend = sub.add_parser("trend", help="print a run's layer-mean trend per step")
    trend.add_argument("run", help="run name")
    trend.add_argument("--metric", choices=KNOWN_METRICS, default=DEFAULT_METRIC,
                       help=f"metric to average over the layers (default: {DEFAULT_METRIC})")
    trend.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    trend.set_defaults(func=remote.cmd_trend)

    export = sub.add_parser(
        "export", help="save every stored score of a run as CSV or Parquet",
        description="Save every stored score of a run, one row per step, layer and metric (columns run, step, "
                    "layer, metric, value, final_norm, job_id; an undefined score is empty in CSV, null in "
                    "Parquet), as the API's GET /v1/runs/RUN/export gives it.")
    export.add_argument("run", help="run name")
    export.add_argument("--format", choices=("csv", "parquet"),
                        help="file format (default: from the -o file's suffix, .csv or .parquet, else csv)")
    export.add_argument("--metric", choices=KNOWN_METRICS, help="only this metric (default: every metric)")
    export.add_argument("-o", "--output", metavar="FILE",
                        help="file to write (default: RUN.csv or RUN.parquet here, '/' in RUN as '_')")
    export.set_defaults(func=remote.cmd_export)

    plot = sub.add_parser("plot", help="save a run's trend, heatmap or layer profile as PNG or SVG")
    plot.add_argument("run", help="run name")
    plot.add_argument("--kind", choices=("trend", "heatmap", "profile"), default="trend",
                      help="trend: layer mean per step; heatmap: step × layer; profile: per layer at a step "
                           "(default: trend)")
    plot.add_argument("--metric", choices=KNOWN_METRICS, default=DEFAULT_METRIC,
                      help=f"metric to draw (default: {DEFAULT_METRIC})")
    plot.add_argument("--step", type=int, action="append", metavar="STEP",
                      help="profile: training step (repeat to compare; default: the last)")
    plot.add_argument("--log-x", action="store_true", help="trend: log-scaled step axis (default: linear)")
    plot.add_argument("-o", "--output", metavar="FILE",
                      help="file to write, .png or .svg (default: RUN-METRIC-KIND.png)")
    plot.set_defaults(func=remote.cmd_plot)

    _add_series(sub)

    tokens = _group(sub, "token", "create, list or revoke API tokens (talks to the database, not the API)")
    tc = tokens.add_parser("create", help="create a token and print it (shown once)")
    tc.add_argument("name", help="what the token is for (shown by 'token list')")
    tc.add_argument("--scope", action="append", type=scope_list, metavar="SCOPE",
                    help="what the token may do (repeat, or comma separate; default: all three): read = dashboards "
                         "and queries; submit = post checkpoints, read, cancel and retry the jobs it submitted; "
                         "admin = webhooks, hook sources, alert rules (and, with submit, any job)")
    tc.add_argument("--runs", action="append", metavar="PATTERN",
                    help="limit the token to the runs whose names match (fnmatch-style, e.g. 'team-a/*'; repeat, "
                         "or comma separate; default: every run). Not for admin tokens")
    tc.set_defaults(func=admin.cmd_token_create)
    tokens.add_parser("list", help="list tokens (id, name, prefix, scopes, runs, created, state)").set_defaults(
        func=admin.cmd_token_list)
    tr = tokens.add_parser("revoke", help="revoke a token by id")
    tr.add_argument("id", type=int, help="the token's id (from 'token list')")
    tr.set_defaults(func=admin.cmd_token_revoke)

    rs = sub.add_parser(
        "rotate-secrets", help="re-encrypt the stored webhook and hook-source secrets with the newest key",
        description="Re-encrypt every stored webhook and hook-source signing secret with the newest key (the first "
                    "of LAYERTRACK_SECRET_KEYS, else of <data dir>/secret.key) and encrypt any stored in clear, so "
                    "that older keys can be removed (docs/deploy.md). Talks to the database.")
    rs.add_argument("--new-key", action="store_true",
                    help="first add a new key at the top of <data dir>/secret.key (when LAYERTRACK_SECRET_KEYS is "
                         "not set)")
    rs.add_argument("--print-key", action="store_true", help="only print a new key (for LAYERTRACK_SECRET_KEYS)")
    rs.set_defaults(func=admin.cmd_rotate_secrets)

    sub.add_parser("migrate", help="bring the database schema up to date",
                   description="Apply the database migrations (LAYERTRACK_DATABASE_URL, else SQLite under "
                               "LAYERTRACK_DATA_DIR).").set_defaults(func=admin.cmd_migrate)

    spool = _group(sub, "spool", "checkpoint submissions kept on disk while the service was unreachable")
    for name, helptext, fn in (("flush", "send them now", remote.cmd_spool_flush),
                               ("list", "list them", remote.cmd_spool_list)):
        sp = spool.add_parser(name, help=helptext)
        sp.add_argument("--dir", metavar="DIR", help="spool directory (default: <data dir>/spool)")
        sp.set_defaults(func=fn)

    hooks = _group(sub, "webhook", "outbound webhooks: subscribe, list, inspect deliveries, redeliver, test")
    hc = hooks.add_parser("create", help="subscribe a URL (prints the signing secret once)")
    hc.add_argument("url", help="the receiver's URL (https://...)")
    hc.add_argument("--event", action="append", choices=WEBHOOK_EVENTS,
                    help=f"event to send (repeat; default: all of {', '.join(WEBHOOK_EVENTS)})")
    hc.add_argument("--run", help="only this run's events (default: every run)")
    hc.set_defaults(func=remote.cmd_webhook_create)
    hooks.add_parser("list", help="list subscriptions").set_defaults(func=remote.cmd_webhook_list)
    hd = hooks.add_parser("deliveries", help="a subscription's deliveries and their attempts")
    hd.add_argument("webhook_id", type=int, help="the subscription's id (from 'webhook list')")
    hd.set_defaults(func=remote.cmd_webhook_deliveries)
    hr = hooks.add_parser("redeliver", help="send a delivery again")
    hr.add_argument("webhook_id", type=int, help="the subscription's id")
    hr.add_argument("delivery_id", help="the delivery's id (from 'webhook deliveries')")
    hr.set_defaults(func=remote.cmd_webhook_redeliver)
    ht = hooks.add_parser("test", help="send a webhook.test event")
    ht.add_argument("webhook_id", type=int, help="the subscription's id")
    ht.set_defaults(func=remote.cmd_webhook_test)

    alert = _group(sub, "alert", "trend alert rules of a run: create, list, delete, and their firings")
    ac = alert.add_parser(
        "create", help="watch a metric of a run (a layer, or the layer mean) as its jobs succeed",
        description="Create an alert rule (needs the admin scope), checked each time one of the run's jobs "
                    "succeeds; each firing is stored ('alert firings') and sent as a trend.alert webhook. "
                    "threshold: fires when the value crosses --above or --below (or the first value is beyond). "
                    "sigma: fires when the value is more than --k standard deviations from the mean of the "
                    "previous --window scored steps.",
        epilog="examples: alert create my-run --metric linearity_nores --above 0.95; "
               "alert create my-run --metric cosine --layer 3 --k 3 --window 10")
    ac.add_argument("run", help="run name")
    ac.add_argument("--metric", required=True, choices=KNOWN_METRICS, help="the metric to watch")
    ac.add_argument("--layer", type=int, metavar="N", help="one layer (block pair N → N+1; for anisotropy the "
                                                           "hidden state N) (default: the layer mean, final-norm "
                                                           "pair left out)")
    ac.add_argument("--kind", choices=tuple(k.value for k in AlertKind),
                    help="default: sigma when --k or --window is given, else threshold")
    ac.add_argument("--above", type=float, metavar="X", help="threshold: fire when the value rises above X")
    ac.add_argument("--below", type=float, metavar="X", help="threshold: fire when the value falls below X")
    ac.add_argument("--k", type=float, metavar="K", help="sigma: how many standard deviations from the mean")
    ac.add_argument("--window", type=int, metavar="N",
                    help="sigma: how many previous scored steps make the mean (2 to 1000; default: 5)")
    ac.add_argument("--description", default="", metavar="TEXT",
                    help="what the rule is for (up to 200 characters; default: none)")
    ac.set_defaults(func=remote.cmd_alert_create)
    al = alert.add_parser("list", help="a run's alert rules")
    al.add_argument("run", help="run name")
    al.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    al.set_defaults(func=remote.cmd_alert_list)
    af = alert.add_parser("firings", help="every firing of a run's alert rules, in step order")
    af.add_argument("run", help="run name")
    af.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    af.set_defaults(func=remote.cmd_alert_firings)
    ad = alert.add_parser("delete", help="delete one of a run's alert rules, with its firings (admin scope)")
    ad.add_argument("run", help="run name")
    ad.add_argument("rule_id", type=positive_int, metavar="RULE_ID", help="the rule's id (from 'alert list')")
    ad.set_defaults(func=remote.cmd_alert_delete)

    src = sub.add_parser(
        "hook-source", help="create a sender of signed POST /v1/hooks/checkpoint requests (with --prefix: of bucket "
        "notifications to POST /v1/hooks/object-store)",
        description="Create a hook source and print its secret (shown once). Without options it signs "
        "POST /v1/hooks/checkpoint requests. With --prefix, an S3-compatible store (MinIO, Ceph RGW, ...) may also "
        "post its bucket notifications to POST /v1/hooks/object-store?source=NAME with the secret as its bearer "
        "token: each object key under the prefix is mapped to a run and step by --pattern, and the checkpoint is "
        "submitted when one of its --marker files lands (docs/integrations.md).")
    src.add_argument("name", help="the sender's name (the ?source= of its requests)")
    src.add_argument("--prefix", metavar="S3_URI",
                     help="bucket notifications: the s3://bucket/path/ the checkpoints lie under (within the "
                          "service's allowed locations)")
    src.add_argument("--pattern", metavar="REGEX",
                     help="how a key below the prefix names a checkpoint: a regular expression with named groups "
                          "'run' and 'step', ending with '/' (default: '(?P<run>[^/]+)/checkpoint-(?P<step>[0-9]+)/', "
                          "i.e. RUN/checkpoint-STEP/)")
    src.add_argument("--marker", action="append", metavar="FILE",
                     help="a file whose arrival submits the checkpoint (repeat; default: model.safetensors.index.json "
                          "and model.safetensors; shards still uploading then make the job wait)")
    src.set_defaults(func=remote.cmd_hook_source)

    # ---------------------------------------------------------------- the demo
    plan, short = PLANS["default"], PLANS["short"]
    demo = sub.add_parser(
        "demo", help="pretrain and fine-tune a small model on CPU, tracked by layertrack; print and plot the dynamics",
        description="Reproduce the paper's training dynamics on this machine (docs/REPRODUCTION.md): pretrain a "
                    "small Llama on the Python standard library's docstrings, fine-tune it on additions, score "
                    "log-spaced checkpoints, and write trend.png, heatmap_*.png and summary.json. Needs the "
                    "worker and integrations extras.",
    )
    demo.add_argument("--out", default="layertrack-demo", metavar="DIR",
                      help="output directory: checkpoints, plots, summary.json (default: ./layertrack-demo); "
                           "the service must be able to read it")
    demo.add_argument("--url", help="layertrack service (default: LAYERTRACK_URL, else a running 'layertrack up' "
                                    "that can read --out, else an embedded one)")
    demo.add_argument("--token", help="API token (default: LAYERTRACK_TOKEN or the saved one)")
    demo.add_argument("--short", action="store_true",
                      help=f"a smoke test: {short.pretrain_steps} + {short.finetune_steps} steps of a "
                           f"d={short.hidden}, {short.layers}-block model (seconds)")
    demo.add_argument("--pretrain-steps", type=positive_int, metavar="N",
                      help=f"pretraining steps (default: {plan.pretrain_steps})")
    demo.add_argument("--finetune-steps", type=positive_int, metavar="N",
                      help=f"fine-tuning steps (default: {plan.finetune_steps})")
    demo.add_argument("--hidden", type=positive_int, metavar="D",
                      help=f"model width d (default: {plan.hidden}; a multiple of {plan.heads}, the heads)")
    demo.add_argument("--layers", type=positive_int, metavar="N", help=f"transformer blocks (default: {plan.layers})")
    demo.add_argument("--regularizer", choices=("cosine", "mse"),
                      help="train with the paper's consecutive-layer regulariser (default: none)")
    demo.add_argument("--lambda", dest="reg_lambda", type=float, default=0.5, metavar="λ",
                      help="regulariser weight λ (default: 0.5)")
    demo.add_argument("--name", help="run name prefix (default: demo-<UTC time>)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data order and initialisation (default: 0)")
    demo.set_defaults(func=local.cmd_demo)
    return parser
