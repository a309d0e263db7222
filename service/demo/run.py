"""``layertrack demo`` from start to end: find or start the service, check that it can read
the output folder, train both phases while the Trainer callback posts checkpoints, score the
last checkpoint of each phase with replaceability, collect the results and report them.

Every failure the user can act on is a :class:`DemoError` whose message is one line that
says what to do (the CLI prints it as ``error: ...``); API errors end the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from layertrack.workers.vocabulary import FINAL_STATUSES

from . import report
from .corpus import addition_task, blocks_of, stdlib_docstrings, train_tokenizer
from .training import build_model, log_spaced, make_plan, train_phase

#: what the demo imports beyond the API side (the worker and integrations extras)
REQUIREMENTS = ("torch", "transformers", "tokenizers", "accelerate")
#: the folder under --out that the readability check submits
CHECK_DIR = ".layertrack-readable"


class DemoError(Exception):
    """The demo cannot go on; the message (one line) says why and what to do."""


def missing_requirement() -> str | None:
    """The first package of REQUIREMENTS that is not installed, or None."""
    for name in REQUIREMENTS:
        if importlib.util.find_spec(name) is None:
            return name
    return None


# ------------------------------------------------------------------ the service
def check_service_reads(client, out: Path) -> None:
    """Raise DemoError unless the service behind ``client`` can read checkpoints in ``out``.

    The service does not publish its checkpoint roots, and comparing paths here would be
    wrong for a service on another machine or in a container, whose file system is not
    ours. So the demo asks the service itself: it writes ``out/.layertrack-readable/
    config.json`` (a config and no weights) and submits that folder. The service checks a
    submission before it stores anything, so it refuses this one without creating a run or
    a job, and the code of its refusal says what it saw:

    - ``no_safetensors_weights``: it found and read the config, so it reads ``out``;
    - ``checkpoint_outside_roots``: ``out`` is not under its checkpoint roots;
    - ``checkpoint_not_found`` / ``not_a_model_directory``: the folder or the file is not
      there for it (another machine, another mount, no permission).
    """
    from ..client import ApiError

    probe = out / CHECK_DIR
    probe.mkdir(parents=True, exist_ok=True)
    (probe / "config.json").write_text(json.dumps({"model_type": "llama"}))
    try:
        job = client.submit(run="layertrack-demo-check", step=0, uri=str(probe))
    except ApiError as e:
        code = e.body.get("code") if isinstance(e.body, dict) else None
        if code == "no_safetensors_weights":
            return
        where = f"layertrack at {client.url}"
        if code == "checkpoint_outside_roots":
            raise DemoError(f"{where} cannot read --out {out}: it is outside the service's checkpoint roots; "
                            "pass --out under one of them, or restart the service with 'layertrack up --roots "
                            f"{out}' (LAYERTRACK_CHECKPOINT_ROOTS)") from None
        if code in ("checkpoint_not_found", "not_a_model_directory"):
            raise DemoError(f"{where} cannot see {probe} ({e.detail}); it runs where --out {out} is not "
                            "visible: give an --out both share, or leave out --url for an embedded service") from None
        raise DemoError(f"{where} refused the demo: {e.detail} (HTTP {e.status})") from None
    finally:
        with contextlib.suppress(OSError):
            (probe / "config.json").unlink()
            probe.rmdir()
    # a config with no weights is never accepted; if it was, do not leave the job queued
    with contextlib.suppress(ApiError):
        client.cancel(job["id"])


def _answers(url: str, token: str) -> bool:
    """Whether the service at ``url`` answers; DemoError when it refuses ``token``."""
    from ..client import ApiError, Client, ServiceUnavailable

    try:
        with Client(url, token, retries=0, timeout=5) as c:
            c.runs(name="--none--")
        return True
    except ServiceUnavailable:
        return False
    except ApiError as e:
        raise DemoError(f"layertrack at {url} refused the demo's token: {e.detail}; pass --token or set "
                        "LAYERTRACK_TOKEN") from None


@contextlib.contextmanager
def demo_service(url: str | None, token: str | None, out: Path) -> Iterator[tuple[str, str, bool]]:
    """(url, token, embedded) of a service that answers and can read ``out``.

    The one named by ``url`` / LAYERTRACK_URL, or a running ``layertrack up`` (its saved URL
    and token), or else an embedded service (API and one worker in child processes, SQLite
    and a file broker under ``out/service``) whose checkpoint root is ``out``: it can always
    read ``out``, and it is stopped when the block ends. A named service that does not
    answer or cannot read ``out`` is an error; a saved one is passed over for an embedded one.
    """
    from ..client import Client, ClientFileError, discover

    explicit = url is not None or "LAYERTRACK_URL" in os.environ
    try:
        found_url, found_token = discover()
    except ClientFileError as e:
        raise DemoError(str(e)) from None
    url, token = url or found_url, token or found_token
    if explicit:
        if not token:
            raise DemoError(f"no API token for layertrack at {url}: pass --token or set LAYERTRACK_TOKEN")
        if not _answers(url, token):
            raise DemoError(f"layertrack at {url} cannot be reached: start it ('layertrack up --roots {out}'), "
                            "or leave out --url and LAYERTRACK_URL for an embedded service")
        with Client(url, token) as c:
            check_service_reads(c, out)
        yield url, token, False
        return
    usable = False
    if token:
        try:
            if _answers(url, token):
                with Client(url, token) as c:
                    check_service_reads(c, out)
                usable = True
        except DemoError as e:
            print(f"not using layertrack at {url}: {e}", file=sys.stderr)
    if usable:
        yield url, token, False
        return
    with embedded_service(out) as (url, token):
        yield url, token, True


@contextlib.contextmanager
def embedded_service(out: Path) -> Iterator[tuple[str, str]]:
    """An API server and one scoring worker for ``out`` (layertrack.service.embedded)."""
    from ..embedded import EmbeddedService

    data = out / "service"
    print(f"starting an embedded layertrack (data and logs in {data}) ...", file=sys.stderr)
    with EmbeddedService(data_dir=data, roots=[out]) as svc:
        try:
            svc.migrate_and_token("demo")
            svc.start_api()
            svc.save_client_file()  # what 'layertrack up --data-dir OUT/service' reads afterwards
        except Exception as e:
            raise DemoError(f"the embedded service did not start ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); see {data / 'api.log'}") from None
        svc.start_worker("demo", queues="gpu")
        yield svc.url, svc.token


# ------------------------------------------------------------------ results
def wait_for(client, runs: list[str], expected: int, timeout: float = 3600) -> list[dict]:
    """Every job of ``runs`` once all have finished (polled each second; a progress bar)."""
    from tqdm.auto import tqdm

    from ..client import ApiError

    def jobs_of(run: str) -> list[dict]:
        try:
            return client.jobs(run=run, limit=1000)
        except ApiError as e:
            if e.status == 404:  # nothing of that run reached the service
                return []
            raise

    deadline = time.monotonic() + timeout
    with tqdm(total=expected, desc="scoring", unit="ckpt") as bar:
        while True:
            jobs = [j for r in runs for j in jobs_of(r)]
            done = [j for j in jobs if j["status"] in FINAL_STATUSES]
            bar.update(len(done) - bar.n)
            if len(done) == len(jobs):
                return jobs
            if time.monotonic() > deadline:
                raise DemoError(f"{len(jobs) - len(done)} scoring job(s) still unfinished after {timeout:g} s; "
                                "is a worker running on the service's gpu queue?")
            time.sleep(1)


def per_block(client, run: str, step: int) -> dict[int, dict[str, float | None]]:
    """Block → metric → value at ``step`` (the pair into the final norm left out)."""
    blocks: dict[int, dict[str, float | None]] = {}
    for m in (*report.METRICS, *report.LOSSES):
        for s in client.scores(run, metric=m, from_step=step, to_step=step)["series"]:
            if not s["final_norm"]:
                blocks.setdefault(s["layer"], {})[m] = s["values"][-1] if s["values"] else None
    return blocks


def collect(client, runs: dict[str, str], last_steps: dict[str, int]) -> tuple[dict, dict, dict]:
    """(trends: phase → metric → trend, heatmaps: phase → heatmap, replaceability: phase → table)."""
    trends = {phase: {m: client.trend(run, metric=m, max_points=1000) for m in report.TABLE_METRICS}
              for phase, run in runs.items()}
    heatmaps = {phase: client.heatmap(run, metric=report.FIGURE_METRIC, max_steps=1000)
                for phase, run in runs.items()}
    replace = {phase: report.replaceability(last_steps[phase], per_block(client, run, last_steps[phase]))
               for phase, run in runs.items()}
    return trends, heatmaps, replace


def collect_dynamics(client, runs: dict[str, str]) -> dict[str, dict]:
    """phase → the drift_cka summary of its run (report.dynamics)."""
    return {phase: report.dynamics(client.heatmap(run, metric="drift_cka", max_steps=1000))
            for phase, run in runs.items()}


def open_command(out: Path) -> str:
    """The command that serves the embedded service's data under ``out`` again, with the
    dashboard: its database, broker and saved token are in ``out/service``."""
    import shlex

    cmd = f"layertrack up --data-dir {shlex.quote(str(out / 'service'))} --roots {shlex.quote(str(out))}"
    # the embedded service stored everything in SQLite and its file broker under out/service,
    # whatever these say: the command must not follow them elsewhere
    unset = [k for k in ("LAYERTRACK_DATABASE_URL", "LAYERTRACK_BROKER_URL") if os.environ.get(k)]
    return (f"env {' '.join(f'-u {k}' for k in unset)} " if unset else "") + cmd


def how_to_open(out: Path, url: str, embedded: bool, run: str) -> str:
    """The demo's last lines: how to look at its results in the dashboard."""
    from ..client import _run as run_path

    if not embedded:
        return f"results: {url}/runs/{run_path(run)} (the dashboard of the service the demo used)"
    return (f"to open the results in the dashboard, run: {open_command(out)}\n"
            f"  then open http://127.0.0.1:8321/runs/{run_path(run)} with the token saved in "
            f"{out / 'service' / 'client.json'}")


# ------------------------------------------------------------------ the demo
def run_demo(args: argparse.Namespace) -> int:
    """The demo as ``layertrack demo`` runs it (``args``: its options); 0 when every job
    succeeded. Raises DemoError for what stops it."""
    from ..client import ApiError

    try:
        plan = make_plan(short=args.short, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                         hidden=args.hidden, layers=args.layers)
    except ValueError as e:
        raise DemoError(str(e)) from None
    out = Path(args.out).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"cannot create --out {out}: {e.strerror}") from None
    name = args.name or f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    try:
        with demo_service(args.url, args.token, out) as (url, token, embedded):
            return _run(args, plan, out, name, url, token, embedded)
    except ApiError as e:
        raise DemoError(f"the service refused a request: {e.detail}" + (f" (HTTP {e.status})" if e.status else "")
                        ) from None


def _run(args, plan, out: Path, name: str, url: str, token: str, embedded: bool) -> int:
    import torch
    from layertrack.integrations.hf import LayertrackCallback
    from transformers import LlamaForCausalLM

    from ..client import Client

    t0 = time.monotonic()
    if embedded:  # its worker has one thread: training gets the others
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    torch.manual_seed(args.seed)

    print("building the corpus (standard-library docstrings) and the tokenizer ...", file=sys.stderr)
    docs = stdlib_docstrings()
    random.Random(args.seed).shuffle(docs)
    task = addition_task(4000 if not args.short else 200, args.seed)
    tokenizer = train_tokenizer(docs + task[:200], plan.vocab)
    pre_data = blocks_of(tokenizer, docs, plan.seq_len)
    ft_data = blocks_of(tokenizer, task, plan.seq_len)
    model = build_model(plan, tokenizer)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: Llama, d={plan.hidden}, {plan.layers} blocks, {n_params:.2f} M parameters; "
          f"pretraining corpus {len(docs)} docstrings ({len(pre_data)} sequences of {plan.seq_len}); "
          f"fine-tuning task {len(task)} additions", file=sys.stderr)
    steps = {"pretrain": log_spaced(plan.pretrain_steps, plan.n_saves),
             "finetune": log_spaced(plan.finetune_steps, max(3, plan.n_saves // 2))}
    last = {"pretrain": plan.pretrain_steps, "finetune": plan.finetune_steps}
    runs = {"pretrain": f"{name}-pretrain", "finetune": f"{name}-finetune"}
    reg = dict(regularizer=args.regularizer, lam=args.reg_lambda)
    common = dict(url=url, token=token, config=plan.score_config, spool_dir=out / "spool", flush_timeout_s=120)

    print(f"pretraining {plan.pretrain_steps} steps, posting steps {steps['pretrain']} as run {runs['pretrain']} "
          f"to {url}", file=sys.stderr)
    train_phase(model=model, tokenizer=tokenizer, data=pre_data, out_dir=out / "pretrain", steps=plan.pretrain_steps,
                plan=plan, save_at=steps["pretrain"], seed=args.seed,
                callback=LayertrackCallback(run=runs["pretrain"], phase="pretrain", **common), **reg)
    ft_model = LlamaForCausalLM.from_pretrained(out / "pretrain" / f"checkpoint-{plan.pretrain_steps}")
    print(f"fine-tuning {plan.finetune_steps} steps on additions, posting steps {steps['finetune']} as run "
          f"{runs['finetune']}", file=sys.stderr)
    train_phase(model=ft_model, tokenizer=tokenizer, data=ft_data, out_dir=out / "finetune", steps=plan.finetune_steps,
                plan=plan, save_at=steps["finetune"], seed=args.seed,
                callback=LayertrackCallback(run=runs["finetune"], phase="finetune", parent_run=runs["pretrain"],
                                            parent_step=plan.pretrain_steps, **common), **reg)

    with Client(url, token) as c:
        replaceability_config = {**plan.score_config, "replaceability": True, "holdout_tokens": plan.holdout_tokens}
        for phase, run in runs.items():
            c.submit(run=run, step=last[phase], uri=str(out / phase / f"checkpoint-{last[phase]}"),
                     config=replaceability_config)
        expected = len(steps["pretrain"]) + len(steps["finetune"]) + 2
        jobs = wait_for(c, list(runs.values()), expected)
        trends, heatmaps, replace = collect(c, runs, last)
        drift = collect_dynamics(c, runs)
    failed = [j for j in jobs if j["status"] != "succeeded"]
    for j in failed:
        print(f"warning: job {j['id']} (run {j['run']} step {j['step']}) {j['status']}: {j['error']}",
              file=sys.stderr)
    if len(jobs) < expected:
        print(f"warning: only {len(jobs)} of {expected} checkpoints reached the service; the others are spooled "
              f"in {out / 'spool'} (see the warnings above)", file=sys.stderr)

    print()
    print(report.trend_table({runs[phase]: trends[phase] for phase in runs}))
    for phase in runs:
        print()
        print(report.replaceability_table(phase, replace[phase]))
    for phase in runs:
        print()
        print(report.dynamics_table(runs[phase], drift[phase]))
    files = report.figures(out, runs=runs, trends=trends, heatmaps=heatmaps, parent_step=plan.pretrain_steps)
    summary = {
        "name": name, "runs": runs, "plan": vars(plan),
        "regularizer": args.regularizer, "lambda": args.reg_lambda if args.regularizer else 0.0,
        "posted_steps": steps, "trends": trends, "replaceability": replace, "dynamics": drift,
        "failed_jobs": [j["id"] for j in failed], "wall_time_s": time.monotonic() - t0,
    }
    files.append(report.write_summary(out, summary))
    print()
    print("wrote " + ", ".join(str(f) for f in files))
    print(f"demo finished in {summary['wall_time_s'] / 60:.1f} min")
    print(how_to_open(out, url, embedded, runs["pretrain"]))
    return 0 if not failed and len(jobs) >= expected else 1
