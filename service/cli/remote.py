"""Commands that call the service's API: submit, status, wait, trend, plot, webhooks, hook
sources, and the spool of submissions kept while the service was unreachable.

Each command is a function ``(client, args) -> exit code`` wrapped in ``@api_command``,
which opens the client (LAYERTRACK_URL / LAYERTRACK_TOKEN, else what ``layertrack up``
saved) and turns every failure into one line: the API's problem-details ``detail`` and its
``code`` (``... (code run_not_found)``), or how to reach or start the service.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from layertrack.workers.vocabulary import AlertKind

from .common import EXIT_FAILED, EXIT_INPUT, EXIT_USAGE, CliError, fmt, score_options, stop_on_ctrl_c_and_sigterm

ApiCommand = Callable[[Any, argparse.Namespace], int | None]


def api_command(fn: ApiCommand) -> Callable[[argparse.Namespace], int]:
    """Run ``fn(client, args)`` with a client of the configured service (closed afterwards);
    ``None`` from ``fn`` means success. A refused request ends as ``error: <detail>``, an
    unreachable service as where it was looked for and how to start it, a timeout as what
    was still unfinished."""

    @functools.wraps(fn)
    def command(args: argparse.Namespace) -> int:
        from ..client import ApiError, Client, ClientFileError, ServiceUnavailable, discover

        try:
            url, token = discover()
        except ClientFileError as e:
            raise CliError(str(e)) from None
        check_service_url(url)
        client = Client(url, token)
        try:
            with client:
                code = fn(client, args)
            return 0 if code is None else code
        except ServiceUnavailable as e:
            if e.status == 0:  # no connection at all
                raise CliError(f"cannot reach layertrack at {client.url}: start it with 'layertrack up', or set "
                               "LAYERTRACK_URL to where it runs", EXIT_INPUT) from None
            raise CliError(f"layertrack at {client.url} is unavailable: {e.detail}", EXIT_INPUT) from None
        except ApiError as e:
            hint = ""
            if e.status == 401:
                hint = ("; set LAYERTRACK_TOKEN to a valid token (create one with 'layertrack token create NAME') "
                        "or run 'layertrack up', which saves one")
            raise CliError(f"{e.detail} ({error_code(e)}){hint}", EXIT_INPUT) from None
        except TimeoutError as e:
            raise CliError(str(e), EXIT_FAILED) from None

    return command


def error_code(e: Any) -> str:
    """``code X`` of an ApiError: the problem's code (every API problem has one), else the status."""
    return f"code {e.code or f'http_{e.status}'}"


def check_service_url(url: str) -> None:
    """CliError unless ``url`` (LAYERTRACK_URL, else the saved one) is an http(s) URL with a host."""
    import os

    import httpx

    from ..client import client_file

    where = "LAYERTRACK_URL" if os.environ.get("LAYERTRACK_URL") else f"saved in {client_file()}"
    problem = None
    try:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            problem = "not an http(s) URL with a host"
    except httpx.InvalidURL as e:
        problem = str(e)
    if problem:
        raise CliError(f"the service URL {url!r} ({where}) is not usable ({problem}); set LAYERTRACK_URL to where "
                       "the service runs, e.g. http://127.0.0.1:8321")


def print_job(job: dict[str, Any]) -> None:
    line = f"job {job['id']}  {job['status']}  run {job['run']} step {job['step']}"
    if job.get("worker"):
        line += f"  worker {job['worker']}"
    if job.get("duration_s") is not None:  # from submission; the worker's own part beside it
        line += f"  {job['duration_s']:.1f} s since submission"
        if job.get("run_s") is not None:
            line += f" ({job['run_s']:.1f} s on the worker)"
    print(line, flush=True)
    if job.get("error"):
        print(f"  error ({job.get('error_code')}): {job['error']}")
    line = progress_line(job)
    if line is not None:
        print(line)
    if job.get("resolved_revision"):
        print(f"  revision {job['resolved_revision']}")


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "?"
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n:.0f} B"


def progress_line(job: dict[str, Any]) -> str | None:
    """One line of a remote checkpoint's progress (fetching: bytes done / total, seconds;
    waiting for an upload or retrying a store: why and until when; scoring), or None when there is none."""
    p = job.get("progress")
    if not p or job.get("status") not in ("queued", "running"):
        return None
    phase = p.get("phase")
    if phase == "fetching" and p.get("bytes_total"):
        done, total = p.get("bytes_done") or 0, p["bytes_total"]
        return (f"  fetching {_size(done)} / {_size(total)} ({100 * done / total:.0f} %), "
                f"{p.get('seconds') or 0:.1f} s")
    return f"  {phase}: {p.get('message') or ''}".rstrip(": ")


def _progress_printer() -> Callable[[dict[str, Any]], None]:
    """An ``on_poll`` for Client.wait that prints a job's progress line when it changes."""
    last: list[str | None] = [None]

    def show(job: dict[str, Any]) -> None:
        line = progress_line(job)
        if line is not None and line != last[0]:
            print(line, flush=True)
        last[0] = line

    return show


def _finished(job: dict[str, Any]) -> int:
    print_job(job)
    return 0 if job["status"] == "succeeded" else EXIT_FAILED


# ------------------------------------------------------------------ jobs
def client_side_uri(uri: str) -> str:
    """The checkpoint location to send: a URI with a scheme (file://, s3://, ...) as given; a
    relative path made absolute here (``Path.resolve``), so the service's working directory
    never matters. An absolute path is sent as given: the service resolves it itself."""
    scheme = urlparse(uri).scheme
    if len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else path.resolve())


@api_command
def cmd_submit(c, args: argparse.Namespace) -> int | None:
    config = score_options(args)
    job = c.submit(run=args.run, step=args.step, uri=client_side_uri(args.uri), phase=args.phase,
                   parent_run=args.parent_run, parent_step=args.parent_step, probe=args.probe,
                   config=config or None)
    print_job(job)
    if args.wait:
        stop_on_ctrl_c_and_sigterm()
        return _finished(c.wait(job["id"], timeout=args.timeout, on_poll=_progress_printer()))
    return None


@api_command
def cmd_status(c, args: argparse.Namespace) -> None:
    print_job(c.job(args.job_id))


@api_command
def cmd_wait(c, args: argparse.Namespace) -> int:
    stop_on_ctrl_c_and_sigterm()
    return _finished(c.wait(args.job_id, timeout=args.timeout, on_poll=_progress_printer()))


@api_command
def cmd_cancel(c, args: argparse.Namespace) -> None:
    print_job(c.cancel(args.job_id))


@api_command
def cmd_retry(c, args: argparse.Namespace) -> None:
    print_job(c.retry(args.job_id))


def _when(iso: str | None) -> str:
    """'2025-06-01 12:34:56' of an ISO timestamp (UTC, as the API gives it); '-' for none."""
    return iso[:19].replace("T", " ") if iso else "-"


@api_command
def cmd_jobs(c, args: argparse.Namespace) -> None:
    found = c.jobs(run=args.run, status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps(found, indent=2))
        return
    if not found:
        print("no jobs" + (f" of run {args.run}" if args.run else "") + (f" {args.status}" if args.status else ""))
        return
    print(f"{'id':<36}  {'status':<9}  {'step':>10}  {'queued (UTC)':<19}  {'duration':>9}  {'worker':<16}  run  "
          "(error code)")
    for j in found:
        duration = f"{j['duration_s']:.1f} s" if j.get("duration_s") is not None else "-"
        error = f"  ({j['error_code']})" if j.get("error_code") else ""
        print(f"{j['id']:<36}  {j['status']:<9}  {j['step']:>10}  {_when(j['queued_at']):<19}  {duration:>9}  "
              f"{(j.get('worker') or '-'):<16}  {j['run']}{error}")
    if len(found) == args.limit:
        print(f"(the newest {args.limit}; --limit N shows more)")


#: the job statuses in the order the runs table shows their counts
_STATUS_COLUMNS = (("queued", "queued"), ("running", "running"), ("succeeded", "done"), ("failed", "failed"),
                   ("cancelled", "cancelled"))


@api_command
def cmd_runs(c, args: argparse.Namespace) -> None:
    found = c.runs(name=args.name)
    if args.json:
        print(json.dumps(found, indent=2))
        return
    if not found:
        print("no runs" + (f" whose name contains {args.name!r}" if args.name else ""))
        return
    counts = "".join(f"  {label:>9}" for _, label in _STATUS_COLUMNS)
    print(f"{'phase':<8}  {'last step':>10}  {'ckpts':>5}{counts}  {'last activity (UTC)':<19}  run (parent)")
    for r in found:
        jobs_ = "".join(f"  {r['jobs'].get(status, 0):>9}" for status, _ in _STATUS_COLUMNS)
        last = "-" if r["last_step"] is None else r["last_step"]
        parent = f"  (from {r['parent_run']} at step {r['parent_step']})" if r.get("parent_run") else ""
        print(f"{r['phase']:<8}  {last:>10}  {r['n_checkpoints']:>5}{jobs_}  {_when(r['last_activity']):<19}  "
              f"{r['name']}{parent}")


def _what_goes(d: dict[str, Any]) -> str:
    """'3 jobs, 2 checkpoints, 96 scores, 1 alert rule with 1 firing, 1 webhook with 2 deliveries'."""
    def n(k: int, one: str, many: str | None = None) -> str:
        return f"{k} {one if k == 1 else (many or one + 's')}"

    parts = [n(d["jobs"], "job"), n(d["checkpoints"], "checkpoint"), n(d["scores"], "score")]
    if d["alert_rules"] or d["alert_firings"]:
        parts.append(f"{n(d['alert_rules'], 'alert rule')} with {n(d['alert_firings'], 'firing')}")
    if d["webhooks"]:
        parts.append(f"{n(d['webhooks'], 'webhook subscription')} limited to it, with "
                     f"{n(d['webhook_deliveries'], 'delivery', 'deliveries')}")
    return ", ".join(parts)


@api_command
def cmd_runs_delete(c, args: argparse.Namespace) -> int | None:
    if not args.yes:
        d = c.delete_run(args.run, dry_run=True)
        print(f"run {d['run']}: deleting it would delete {_what_goes(d)}")
        if d["child_runs"]:
            print(f"  its fine-tune(s) {', '.join(d['child_runs'])} would stay, without a parent")
        if d["active_jobs"]:
            print(f"  {len(d['active_jobs'])} job(s) are queued or running ({', '.join(d['active_jobs'][:5])}): "
                  "cancel them first ('layertrack cancel JOB')")
        raise CliError(f"run {args.run!r} was not deleted: add --yes to delete it and all of the above", EXIT_USAGE)
    d = c.delete_run(args.run)
    print(f"deleted run {d['run']}: {_what_goes(d)}")
    if d["child_runs"]:
        print(f"  its fine-tune(s) {', '.join(d['child_runs'])} stay, without a parent")
    return None


# ------------------------------------------------------------------ results
def no_scores_line(c, run: str, metric: str) -> str:
    """Why a run has no trend of ``metric``: its jobs by status, and what to do."""
    from layertrack.workers.vocabulary import REPLACEABILITY_METRICS

    jobs = c.run(run).get("jobs") or {}
    counts = ", ".join(f"{n} {status}" for status, n in sorted(jobs.items()) if n)
    line = f"run {run} has no {metric} scores yet (jobs: {counts or 'none'})"
    if metric in REPLACEABILITY_METRICS and jobs.get("succeeded"):
        return line + f"; {metric} is measured only by jobs submitted with --replaceability"
    if jobs.get("queued") or jobs.get("running"):
        return line + f"; 'layertrack jobs --run {run}' follows them"
    if jobs.get("failed"):
        return line + f"; 'layertrack jobs --run {run} --status failed' shows why they failed"
    return line


@api_command
def cmd_trend(c, args: argparse.Namespace) -> None:
    t = c.trend(args.run, metric=args.metric)
    if args.json:
        print(json.dumps(t, indent=2))
        return
    if not t["steps"]:  # one line that says why, not an empty table
        print(no_scores_line(c, args.run, args.metric))
        return
    print(f"run {args.run}  metric {args.metric} (layer mean, final-norm pair left out)")
    print(f"{'step':>10} {'value':>10}")
    for step, value in zip(t["steps"], t["values"], strict=True):
        print(f"{step:>10} {fmt(value)}")


EXPORT_FORMATS = {".csv": "csv", ".parquet": "parquet"}


@api_command
def cmd_export(c, args: argparse.Namespace) -> None:
    format_ = args.format
    if args.output and format_ is None:  # from the file name, else CSV
        format_ = EXPORT_FORMATS.get(Path(args.output).suffix.lower(), "csv")
    format_ = format_ or "csv"
    out = Path(args.output or f"{args.run.replace('/', '_')}.{format_}")
    if out.is_dir():
        raise CliError(f"{out} is a directory: give a file name with -o, e.g. -o {out / ('scores.' + format_)}",
                       EXIT_USAGE)
    try:
        n = c.export_to(args.run, out, format=format_, metric=args.metric)
    except OSError as e:
        raise CliError(f"cannot write {out}: {e.strerror}; pick another file with -o") from None
    what = f"{args.metric} scores" if args.metric else "scores"
    print(f"wrote {out} ({format_}, {n} bytes): every stored {what} of run {args.run}")


@api_command
def cmd_plot(c, args: argparse.Namespace) -> None:
    out = Path(args.output or f"{args.run.replace('/', '_')}-{args.metric}-{args.kind}.png")
    format_ = out.suffix.lstrip(".").lower()
    if format_ not in ("png", "svg"):  # checked before any request is sent
        raise CliError(f"the output must end in .png or .svg, not {out.name!r}", EXIT_USAGE)
    data = c.plot(args.run, args.kind, format=format_, metric=args.metric, steps=args.step, log_x=args.log_x)
    try:
        out.write_bytes(data)
    except OSError as e:
        raise CliError(f"cannot write {out}: {e.strerror}; pick another file with -o") from None
    print(f"wrote {out} ({len(data)} bytes)")


# ------------------------------------------------------------------ webhooks and hook sources
@api_command
def cmd_webhook_create(c, args: argparse.Namespace) -> None:
    w = c.create_webhook(args.url, events=args.event, run=args.run)
    scope = f"run {w['run']}" if w["run"] else "every run"
    print(f"webhook {w['id']}  {w['url']}  events {', '.join(w['events'])}  {scope}")
    print(f"signing secret (shown once): {w['secret']}")


@api_command
def cmd_webhook_list(c, _args: argparse.Namespace) -> None:
    for w in c.webhooks():
        print(f"{w['id']:>5}  {w['url']}  {', '.join(w['events'])}  run {w['run'] or '(all)'}")


@api_command
def cmd_webhook_deliveries(c, args: argparse.Namespace) -> None:
    for d in c.deliveries(args.webhook_id):
        print(f"{d['id']}  {d['event']:<14} {d['status']:<10} attempts {d['attempts']}")
        for a in d["attempt_log"]:
            print(f"    {a['attempted_at']}  {a['status_code'] or '-'}  {a['duration_ms']:.0f} ms"
                  + (f"  {a['error']}" if a["error"] else ""))


@api_command
def cmd_webhook_redeliver(c, args: argparse.Namespace) -> None:
    d = c.redeliver(args.webhook_id, args.delivery_id)
    print(f"{d['id']} queued again")


@api_command
def cmd_webhook_test(c, args: argparse.Namespace) -> None:
    d = c.test_webhook(args.webhook_id)
    print(f"test event {d['id']} queued")


@api_command
def cmd_hook_source(c, args: argparse.Namespace) -> None:
    if (args.pattern or args.marker) and not args.prefix:
        raise CliError("--pattern and --marker map the keys under a --prefix: give --prefix s3://bucket/path/ too",
                       EXIT_USAGE)
    src = c.create_hook_source(args.name, prefix=args.prefix, pattern=args.pattern, markers=args.marker)
    print(f"hook source {src['name']}: sign POST /v1/hooks/checkpoint?source={src['name']} with")
    print(f"secret (shown once): {src['secret']}")
    if src.get("prefix"):
        print(f"bucket notifications: POST /v1/hooks/object-store?source={src['name']} with "
              "'Authorization: Bearer <that secret>'")
        print(f"  keys under {src['prefix'].rstrip('/')}/ matching {src['pattern']}")
        print(f"  a checkpoint is submitted when one of {', '.join(src['markers'])} lands")


# ------------------------------------------------------------------ trend alerts
def _condition(rule: dict[str, Any]) -> str:
    """'above 0.9', 'below 0.1 or above 0.9', '> 3 sigma of the previous 5'."""
    if rule["kind"] == AlertKind.sigma:
        return f"more than {rule['k']:g} sd from the mean of the previous {rule['window']}"
    sides = [f"below {rule['below']:g}"] if rule.get("below") is not None else []
    sides += [f"above {rule['above']:g}"] if rule.get("above") is not None else []
    return " or ".join(sides)


def _watched(rule: dict[str, Any]) -> str:
    return f"{rule['metric']} " + ("layer mean" if rule.get("layer") is None else f"layer {rule['layer']}")


@api_command
def cmd_alert_create(c, args: argparse.Namespace) -> None:
    kind = args.kind or (AlertKind.sigma if args.k is not None or args.window is not None else AlertKind.threshold)
    rule = c.create_alert(args.run, metric=args.metric, kind=kind, layer=args.layer, above=args.above,
                          below=args.below, k=args.k, window=args.window, description=args.description)
    print(f"alert rule {rule['id']} on run {rule['run']}: {_watched(rule)} {_condition(rule)} ({rule['kind']})")


@api_command
def cmd_alert_list(c, args: argparse.Namespace) -> None:
    rules = c.alerts(args.run)
    if args.json:
        print(json.dumps(rules, indent=2))
        return
    if not rules:
        print(f"run {args.run} has no alert rules ('layertrack alert create {args.run} --metric ...' makes one)")
        return
    print(f"{'id':>5}  {'kind':<9}  {'watches':<28}  fires when")
    for r in rules:
        note = f"  ({r['description']})" if r.get("description") else ""
        print(f"{r['id']:>5}  {r['kind']:<9}  {_watched(r):<28}  {_condition(r)}{note}")


@api_command
def cmd_alert_firings(c, args: argparse.Namespace) -> None:
    fired = c.firings(args.run)
    if args.json:
        print(json.dumps(fired, indent=2))
        return
    if not fired:
        print(f"no alert of run {args.run} has fired")
        return
    print(f"{'step':>10}  {'rule':>5}  {'value':>10}  {'job':<36}  message")
    for f in fired:
        print(f"{f['step']:>10}  {f['rule_id']:>5}  {fmt(f['value'])}  {f.get('job_id') or '-':<36}  {f['message']}")


@api_command
def cmd_alert_delete(c, args: argparse.Namespace) -> None:
    c.delete_alert(args.run, args.rule_id)
    print(f"alert rule {args.rule_id} of run {args.run} deleted, with its firings")


# ------------------------------------------------------------------ the spool
def cmd_spool_flush(args: argparse.Namespace) -> int:
    from layertrack.integrations import flush_spool

    sent, left = flush_spool(args.dir)
    print(f"sent {sent} spooled submission(s); {left} left")
    if left:
        raise CliError(f"{left} spooled submission(s) were not taken: check that the service answers "
                       "(LAYERTRACK_URL, 'layertrack up') and run 'layertrack spool flush' again", EXIT_FAILED)
    return 0


def cmd_spool_list(args: argparse.Namespace) -> int:
    from layertrack.integrations.reporter import default_spool_dir

    folder = Path(args.dir) if args.dir else default_spool_dir()
    entries = sorted(folder.glob("*.json")) if folder.is_dir() else []
    unreadable = 0
    for p in entries:
        try:
            e = json.loads(p.read_text())
            b = e["body"]
            line = f"{e['url']}  run {b['run']} step {b['step']}  {b['uri']}"
        except (OSError, ValueError, KeyError, TypeError):
            unreadable += 1
            line = f"{p.name}: not a readable spooled submission"
        print(line)  # outside the try: a closed stdout (BrokenPipeError is an OSError) is not an unreadable file
    print(f"{len(entries)} spooled submission(s) in {folder}" + (f" ({unreadable} unreadable)" if unreadable else ""))
    return 0
