"""The ``layertrack`` command line.

    layertrack score PATH_OR_URI [--probe FILE] [--max-tokens N] [--seq-len N]
                     [--dtype float32|bfloat16|float16] [--drop-first-token] [--json]

This module imports no torch: commands that need the compute side import it when they run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_INPUT = 3


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layertrack",
        description="Track how the layers of a transformer language model change while it trains.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    score = sub.add_parser(
        "score",
        help="score every layer of one checkpoint on the probe text and print the table",
        description=(
            "Load a Hugging Face causal-LM checkpoint directory (safetensors), run the probe "
            "text through it once, and print per-layer linearity, residual-removed linearity, "
            "cosine, norm ratio and anisotropy."
        ),
    )
    score.add_argument("checkpoint", metavar="PATH_OR_URI", help="checkpoint directory or file:// URI")
    score.add_argument("--probe", metavar="FILE", help="UTF-8 .txt or .jsonl probe (default: built-in)")
    score.add_argument(
        "--max-tokens", type=_positive_int, metavar="N",
        help="tokens to score (default: max(16384, 8*d), capped by the probe)",
    )
    score.add_argument("--seq-len", type=_positive_int, default=512, metavar="N",
                       help="tokens per sequence (512)")
    score.add_argument("--batch-size", type=_positive_int, metavar="N",
                       help="sequences per forward pass (CPU: 1024 tokens)")
    score.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="model dtype (CPU: float32, CUDA: bfloat16)")
    score.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    score.add_argument("--drop-first-token", action="store_true",
                       help="do not score the first token of each sequence (attention sink)")
    score.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory, when the checkpoint has none")
    score.add_argument("--allow-pickle", action="store_true",
                       help="allow pytorch_model.bin weights (loaded with weights_only=True)")
    score.add_argument("--seed", type=int, default=0, help="seed of the probe's document order (0)")
    score.add_argument("--replaceability", action="store_true",
                       help="also measure, per block, the held-out LM loss change when the block is replaced "
                            "by its fitted linear map and when it is dropped (2 extra passes per block)")
    score.add_argument("--holdout-tokens", type=_positive_int, default=4096, metavar="N",
                       help="held-out probe tokens for --replaceability (4096)")
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=cmd_score)

    up = sub.add_parser("up", help="start the API and one worker on this machine (no servers needed)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8321)
    up.add_argument("--no-worker", action="store_true", help="start only the API")
    up.set_defaults(func=cmd_up)

    sub_ = sub.add_parser("submit", help="submit a checkpoint for scoring")
    sub_.add_argument("run", help="run name")
    sub_.add_argument("step", type=int, help="training step")
    sub_.add_argument("uri", help="checkpoint directory or file:// URI (as the service sees it)")
    sub_.add_argument("--phase", choices=("pretrain", "finetune"))
    sub_.add_argument("--parent-run")
    sub_.add_argument("--parent-step", type=int)
    sub_.add_argument("--max-tokens", type=_positive_int)
    sub_.add_argument("--seq-len", type=_positive_int)
    sub_.add_argument("--drop-first-token", action="store_true")
    sub_.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    sub_.add_argument("--wait", action="store_true", help="wait for the job to finish")
    sub_.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="show a job")
    status.add_argument("job_id")
    status.set_defaults(func=cmd_status)

    wait = sub.add_parser("wait", help="wait until a job has finished; exit 0 if it succeeded")
    wait.add_argument("job_id")
    wait.add_argument("--timeout", type=float, default=3600.0)
    wait.set_defaults(func=cmd_wait)

    trend = sub.add_parser("trend", help="print a run's layer-mean trend per step")
    trend.add_argument("run")
    trend.add_argument("--metric", default="linearity")
    trend.add_argument("--json", action="store_true")
    trend.set_defaults(func=cmd_trend)

    token = sub.add_parser("token", help="create, list or revoke API tokens (talks to the database)")
    tsub = token.add_subparsers(dest="token_command", metavar="ACTION")
    tsub.required = True
    tc = tsub.add_parser("create", help="create a token and print it (shown once)")
    tc.add_argument("name")
    tc.set_defaults(func=cmd_token_create)
    tsub.add_parser("list", help="list tokens").set_defaults(func=cmd_token_list)
    tr = tsub.add_parser("revoke", help="revoke a token by id")
    tr.add_argument("id", type=int)
    tr.set_defaults(func=cmd_token_revoke)

    sub.add_parser("migrate", help="bring the database schema up to date").set_defaults(func=cmd_migrate)

    spool = sub.add_parser("spool", help="checkpoint submissions kept while the service was unreachable")
    ssub = spool.add_subparsers(dest="spool_command", metavar="ACTION")
    ssub.required = True
    for name, helptext, fn in (("flush", "send them now", cmd_spool_flush), ("list", "list them", cmd_spool_list)):
        sp = ssub.add_parser(name, help=helptext)
        sp.add_argument("--dir", help="spool directory (default: <data dir>/spool)")
        sp.set_defaults(func=fn)

    hook = sub.add_parser("webhook", help="outbound webhooks: subscribe, list, inspect deliveries, redeliver, test")
    hsub = hook.add_subparsers(dest="webhook_command", metavar="ACTION")
    hsub.required = True
    hc = hsub.add_parser("create", help="subscribe a URL (prints the signing secret once)")
    hc.add_argument("url")
    hc.add_argument("--event", action="append", choices=("job.succeeded", "job.failed", "trend.alert"),
                    help="event to send (repeat; default: all three)")
    hc.add_argument("--run", help="only this run's events")
    hc.set_defaults(func=cmd_webhook_create)
    hsub.add_parser("list", help="list subscriptions").set_defaults(func=cmd_webhook_list)
    hd = hsub.add_parser("deliveries", help="a subscription's deliveries and their attempts")
    hd.add_argument("webhook_id", type=int)
    hd.set_defaults(func=cmd_webhook_deliveries)
    hr = hsub.add_parser("redeliver", help="send a delivery again")
    hr.add_argument("webhook_id", type=int)
    hr.add_argument("delivery_id")
    hr.set_defaults(func=cmd_webhook_redeliver)
    ht = hsub.add_parser("test", help="send a webhook.test event")
    ht.add_argument("webhook_id", type=int)
    ht.set_defaults(func=cmd_webhook_test)

    plot = sub.add_parser("plot", help="save a run's trend, heatmap or layer profile as PNG or SVG")
    plot.add_argument("run")
    plot.add_argument("--kind", choices=("trend", "heatmap", "profile"), default="trend")
    plot.add_argument("--metric", default="linearity_nores")
    plot.add_argument("--step", type=int, action="append", help="profile: step (repeat to compare; default: last)")
    plot.add_argument("--log-x", action="store_true", help="trend: log-scaled step axis")
    plot.add_argument("-o", "--output", help="file to write, .png or .svg (default: RUN-METRIC-KIND.png)")
    plot.set_defaults(func=cmd_plot)

    demo = sub.add_parser(
        "demo", help="pretrain and fine-tune a small model on CPU, tracked by layertrack; print and plot the dynamics",
        description="Reproduce the paper's training dynamics on this machine (docs/REPRODUCTION.md): pretrain a "
                    "small Llama on the Python standard library's docstrings, fine-tune it on additions, score "
                    "log-spaced checkpoints, and write trend.png, heatmap_*.png and summary.json.",
    )
    demo.add_argument("--out", default="layertrack-demo", help="output directory (checkpoints, plots, summary)")
    demo.add_argument("--url", help="layertrack service (default: LAYERTRACK_URL, else an embedded one)")
    demo.add_argument("--token", help="API token (default: LAYERTRACK_TOKEN or the saved one)")
    demo.add_argument("--short", action="store_true", help="a few steps of a tiny model (a smoke test)")
    demo.add_argument("--pretrain-steps", type=_positive_int, help="pretraining steps (1000)")
    demo.add_argument("--finetune-steps", type=_positive_int, help="fine-tuning steps (250)")
    demo.add_argument("--hidden", type=_positive_int, help="model width d (128; a multiple of 4)")
    demo.add_argument("--layers", type=_positive_int, help="transformer blocks (8)")
    demo.add_argument("--regularizer", choices=("cosine", "mse"),
                      help="train with the paper's consecutive-layer regulariser")
    demo.add_argument("--lambda", dest="reg_lambda", type=float, default=0.5, help="regulariser weight λ (0.5)")
    demo.add_argument("--name", help="run name prefix (default: demo-<time>)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    src = sub.add_parser("hook-source", help="create a sender of signed POST /v1/hooks/checkpoint requests")
    src.add_argument("name")
    src.set_defaults(func=cmd_hook_source)
    return parser


def _fmt(value: float | None, width: int = 10) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return f"{value:{width}.6f}"


def render_table(result: dict[str, Any]) -> str:
    pairs = {p["layer"]: p for p in result["pairs"]}
    layers = {s["layer"]: s for s in result["layers"]}
    lines = [
        f"model {result['model_type']}  blocks {result['n_layers']}  d {result['d']}  "
        f"dtype {result['dtype']}  device {result['device']}",
        f"n_tokens {result['n_tokens']}  chance {result['chance']:.4f}  "
        f"seq_len {result['seq_len']}  probe {result['probe_name']} ({result['probe_sha256'][:12]})",
        "",
        f"{'layer':>7} {'linearity':>10} {'lin_nores':>10} {'cosine':>10} {'norm_ratio':>10} {'anisotropy':>10}"
        + (f" {'Δloss_lin':>10} {'Δloss_drop':>10}" if result.get("holdout") else ""),
    ]
    flagged = False
    for i in sorted(layers):
        p = pairs.get(i)
        mark = ""
        if p and p.get("final_norm"):
            mark, flagged = " *", True
        label = f"{i}->{i + 1}" if p else f"{i}"
        lines.append(
            f"{label:>7} {_fmt(p and p['linearity'])} {_fmt(p and p['linearity_nores'])} "
            f"{_fmt(p and p['cosine'])} {_fmt(p and p['norm_ratio'])} {_fmt(layers[i]['anisotropy'])}"
            + (f" {_fmt(p and p['loss_delta_linear'])} {_fmt(p and p['loss_delta_drop'])}"
               if result.get("holdout") else "") + mark
        )
    if flagged:
        lines.append("")
        lines.append("* into the final-norm output: a different kind of map, not comparable to the others")
    if result.get("holdout"):
        h = result["holdout"]
        lines.append("")
        lines.append(f"Δloss: held-out LM loss (nats/token, {h['n_tokens']} tokens; intact {h['intact_loss']:.4f}) "
                     "with the block replaced by its fitted linear map (lin) or dropped (drop), minus intact")
    for w in result.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def cmd_score(args: argparse.Namespace) -> int:
    try:
        from layertrack.workers.errors import LayertrackError
        from layertrack.workers.scoring import ScoreConfig, score_checkpoint
    except ImportError as e:
        print(
            f"error: scoring needs the worker extra ({e.name} is missing): "
            "pip install 'layertrack[worker]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    config = ScoreConfig(
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        drop_first_token=args.drop_first_token,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        allow_pickle=args.allow_pickle,
        replaceability=args.replaceability,
        holdout_tokens=args.holdout_tokens,
    )
    try:
        result = score_checkpoint(
            args.checkpoint,
            probe=args.probe,
            config=config,
            tokenizer_path=args.tokenizer,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    except LayertrackError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return EXIT_INPUT
    out = result.to_dict()
    if args.json:
        print(json.dumps(_finite(out), indent=2, allow_nan=False))
    else:
        print(render_table(out))
    return 0


def _finite(value: Any) -> Any:
    """JSON has no NaN: an undefined score (a block that does nothing) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ------------------------------------------------------------------ service commands
def _client():
    from .client import Client

    return Client()


def _print_job(job: dict[str, Any]) -> None:
    line = f"job {job['id']}  {job['status']}  run {job['run']} step {job['step']}"
    if job.get("worker"):
        line += f"  worker {job['worker']}"
    if job.get("duration_s") is not None:
        line += f"  {job['duration_s']:.1f} s"
    print(line)
    if job.get("error"):
        print(f"  error ({job.get('error_code')}): {job['error']}")


def _api_call(fn) -> int:
    from .client import ApiError

    try:
        return fn()
    except ApiError as e:
        print(f"error: {e.detail}" + (f" (HTTP {e.status})" if e.status else ""), file=sys.stderr)
        return EXIT_INPUT
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def cmd_submit(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client() as c:
            config = {k: v for k, v in {
                "max_tokens": args.max_tokens, "seq_len": args.seq_len, "dtype": args.dtype,
                "drop_first_token": args.drop_first_token or None}.items() if v is not None}
            job = c.submit(run=args.run, step=args.step, uri=args.uri, phase=args.phase,
                           parent_run=args.parent_run, parent_step=args.parent_step, config=config or None)
            _print_job(job)
            if args.wait:
                job = c.wait(job["id"])
                _print_job(job)
                return 0 if job["status"] == "succeeded" else 1
        return 0

    return _api_call(go)


def cmd_status(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client() as c:
            _print_job(c.job(args.job_id))
        return 0

    return _api_call(go)


def cmd_wait(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client() as c:
            job = c.wait(args.job_id, timeout=args.timeout)
        _print_job(job)
        return 0 if job["status"] == "succeeded" else 1

    return _api_call(go)


def cmd_trend(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client() as c:
            t = c.trend(args.run, metric=args.metric)
        if args.json:
            print(json.dumps(t, indent=2))
            return 0
        print(f"run {args.run}  metric {args.metric} (layer mean, final-norm pair left out)")
        print(f"{'step':>10} {'value':>10}")
        for step, value in zip(t["steps"], t["values"], strict=True):
            print(f"{step:>10} {_fmt(value)}")
        return 0

    return _api_call(go)


def cmd_spool_flush(args: argparse.Namespace) -> int:
    from layertrack.integrations import flush_spool

    sent, left = flush_spool(args.dir)
    print(f"sent {sent} spooled submission(s); {left} left")
    return 0 if left == 0 else 1


def cmd_spool_list(args: argparse.Namespace) -> int:
    from layertrack.integrations.reporter import default_spool_dir

    folder = Path(args.dir) if args.dir else default_spool_dir()
    entries = sorted(folder.glob("*.json")) if folder.is_dir() else []
    for p in entries:
        e = json.loads(p.read_text())
        b = e["body"]
        print(f"{e['url']}  run {b['run']} step {b['step']}  {b['uri']}")
    print(f"{len(entries)} spooled submission(s) in {folder}")
    return 0


def cmd_webhook_create(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client() as c:
            w = c.create_webhook(args.url, events=args.event, run=args.run)
        scope = f"run {w['run']}" if w["run"] else "every run"
        print(f"webhook {w['id']}  {w['url']}  events {', '.join(w['events'])}  {scope}")
        print(f"signing secret (shown once): {w['secret']}")
        return 0

    return _api_call(go)


def cmd_webhook_list(_args: argparse.Namespace) -> int:
    def go() -> int:
        with _client() as c:
            for w in c.webhooks():
                print(f"{w['id']:>5}  {w['url']}  {', '.join(w['events'])}  run {w['run'] or '(all)'}")
        return 0

    return _api_call(go)


def cmd_webhook_deliveries(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client() as c:
            for d in c.deliveries(args.webhook_id):
                print(f"{d['id']}  {d['event']:<14} {d['status']:<10} attempts {d['attempts']}")
                for a in d["attempt_log"]:
                    print(f"    {a['attempted_at']}  {a['status_code'] or '-'}  {a['duration_ms']:.0f} ms"
                          + (f"  {a['error']}" if a["error"] else ""))
        return 0

    return _api_call(go)


def cmd_webhook_redeliver(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client() as c:
            d = c.redeliver(args.webhook_id, args.delivery_id)
        print(f"{d['id']} queued again")
        return 0

    return _api_call(go)


def cmd_webhook_test(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client() as c:
            d = c.test_webhook(args.webhook_id)
        print(f"test event {d['id']} queued")
        return 0

    return _api_call(go)


def cmd_hook_source(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client() as c:
            src = c.create_hook_source(args.name)
        print(f"hook source {src['name']}: sign POST /v1/hooks/checkpoint?source={src['name']} with")
        print(f"secret (shown once): {src['secret']}")
        return 0

    return _api_call(go)


def cmd_plot(args: argparse.Namespace) -> int:
    out = Path(args.output or f"{args.run.replace('/', '_')}-{args.metric}-{args.kind}.png")
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in ("png", "svg"):
        print(f"error: the output must end in .png or .svg, not {out.name!r}", file=sys.stderr)
        return EXIT_USAGE

    def go() -> int:
        with _client() as c:
            data = c.plot(args.run, args.kind, format=fmt, metric=args.metric, steps=args.step, log_x=args.log_x)
        out.write_bytes(data)
        print(f"wrote {out} ({len(data)} bytes)")
        return 0

    return _api_call(go)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .demo import run_demo
    except ImportError as e:
        print(f"error: the demo needs the worker and integrations extras ({e.name} is missing): "
              "pip install 'layertrack[worker,integrations]'", file=sys.stderr)
        return EXIT_USAGE
    return run_demo(args)


def cmd_migrate(_args: argparse.Namespace) -> int:
    from .db import upgrade
    from .settings import get_settings

    s = get_settings()
    upgrade(s.db_url)
    print(f"database at {_safe_url(s.db_url)} is up to date")
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _session():
    from .db import session_scope
    from .settings import get_settings

    return session_scope(get_settings().db_url)


def cmd_token_create(args: argparse.Namespace) -> int:
    from .auth import create_token

    with _session() as s:
        row, secret = create_token(s, args.name)
        print(f"token {row.id} ({row.name}): {secret}")
    print("keep it: it is not shown again", file=sys.stderr)
    return 0


def cmd_token_list(_args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from .models import ApiToken

    with _session() as s:
        for t in s.scalars(select(ApiToken).order_by(ApiToken.id)):
            state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
            print(f"{t.id:>4}  {t.name:<24} {t.prefix}...  created {t.created_at:%Y-%m-%d %H:%M}  {state}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from .auth import revoke

    with _session() as s:
        row = revoke(s, args.id)
        if row is None:
            print(f"error: no token with id {args.id}", file=sys.stderr)
            return EXIT_INPUT
    print(f"token {args.id} revoked")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    import os
    import signal
    import subprocess

    import uvicorn
    from sqlalchemy import func, select

    from .app import create_app
    from .auth import create_token
    from .db import session_scope, upgrade
    from .models import ApiToken
    from .settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.db_url)
    url = f"http://{args.host}:{args.port}"
    cfile = settings.data_dir / "client.json"
    with session_scope(settings.db_url) as s:
        if not s.scalar(select(func.count(ApiToken.id))):
            _row, secret = create_token(s, "default")
            cfile.write_text(json.dumps({"url": url, "token": secret}))
            os.chmod(cfile, 0o600)
        elif cfile.is_file():
            saved = json.loads(cfile.read_text())
            saved["url"] = url
            cfile.write_text(json.dumps(saved))
    workers = []
    if not args.no_worker:
        celery = [sys.executable, "-m", "celery", "-A", "layertrack.workers.celery_app", "worker", "--loglevel", "INFO"]
        workers.append(subprocess.Popen([*celery, "-Q", "gpu", "-c", "1", "--prefetch-multiplier", "1",
                                         "-n", "embedded@%h"]))
        # webhook deliveries: a light worker of their own, so a long scoring job never delays them
        workers.append(subprocess.Popen([*celery, "-Q", "webhooks", "-P", "threads", "-c", "4",
                                         "-n", "embedded-hooks@%h"]))
    print(f"layertrack is up at {url}  (API docs: {url}/docs)")
    print(f"database {_safe_url(settings.db_url)}; broker {settings.broker}")
    print(f"checkpoint roots: {', '.join(map(str, settings.roots))}")
    print(f"API token for the CLI and client: {cfile}" if cfile.is_file() else
          "no saved token: create one with 'layertrack token create NAME'")
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
