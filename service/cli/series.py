"""``layertrack watch`` and ``layertrack backfill``: checkpoint series where training writes them.

Both list LOCATION on this machine (the CLI's), with the store client libraries installed
here (the extras ``s3``, ``gcs``, ``azure``, ``hub``) and this machine's credentials
(``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``, ``HF_TOKEN``,
``HF_ENDPOINT``), and submit each checkpoint through the API; the service's workers then read
it with theirs. Nothing of a training framework is needed: a checkpoint is a directory whose
name carries its step (``checkpoint-1000/``, ``step_2000/``, ``global_step3000/``, or
``--step-pattern``), or a Hub revision whose name does (``step1000``).

- ``watch`` looks again every ``--interval`` seconds and submits each new COMPLETE checkpoint
  once: complete as the workers judge it (``checkpoint_files``: config.json, the weights, every
  shard the index names), and, for a local directory, every safetensors file whole (its header
  and tensors within the file) and the directory's files unchanged over ``--settle`` seconds.
  A local training-framework checkpoint (``--format``, or detected: no config.json) is complete
  by its framework's commit (DCP's ``.metadata``, a whole ``ckpt.pt`` archive), then settled.
  What it submitted is kept in a small state file (``--state``), so a restarted watch does not
  even resubmit; the service's idempotency (the same run, step, checkpoint, probe and config
  is the same job: a 200 with that job) covers a lost state file.
- ``backfill`` submits an existing series in step order: every checkpoint directory under the
  location, or every revision of a Hub repository matching ``--revisions``; ``--every K`` or
  ``--log-spaced N`` take a subset; ``--dry-run`` lists it.

Local directories are submitted as absolute paths, remote checkpoints by their normalised URI.
The store libraries are imported when a command runs, never when this module is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .common import EXIT_USAGE, CliError, one_line, score_options, stop_on_ctrl_c_and_sigterm
from .remote import api_command, error_code

#: a checkpoint directory's name: checkpoint-1000, checkpoint_1000, step1000, step_1000,
#: step-1000, global_step1000, iter_0001000, ckpt-1000 (matched against the whole name)
DEFAULT_STEP_PATTERN = r"(?:checkpoint|global_step|step|iter|ckpt)[-_]?(?P<step>[0-9]+)"
#: a Hub revision's name: step1000 (Pythia), step1000-tokens4B, stage1-step1000-tokens4B (OLMo)
DEFAULT_REVISION_PATTERN = r"(?:.*[-_])?(?:checkpoint|global_step|step|iter|ckpt)[-_]?(?P<step>[0-9]+)(?:[-_.].*)?"
DEFAULT_INTERVAL_S = 30.0
DEFAULT_SETTLE_S = 2.0


# ------------------------------------------------------------------ what a command is given
def step_pattern(text: str) -> re.Pattern:
    """An argparse type: a regular expression with a named group ``step`` or a first group."""
    try:
        pattern = re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression ({e})") from None
    if "step" not in pattern.groupindex and pattern.groups < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no group for the step: write e.g. 'ckpt_(?P<step>[0-9]+)' or 'ckpt_([0-9]+)'")
    return pattern


def _step_of(pattern: re.Pattern, name: str) -> int | None:
    m = pattern.fullmatch(name)
    if m is None:
        return None
    text = m.group("step") if "step" in pattern.groupindex else m.group(1)
    if text is None or not text.isdigit():
        return None
    return int(text)


def _location(text: str):
    from layertrack.workers.errors import LayertrackError
    from layertrack.workers.locations import parse

    try:
        return parse(text)
    except LayertrackError as e:
        raise CliError(f"{e} ({e.code})") from None


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The scoring config sent with every submission (what ``submit`` sends for its options)."""
    return score_options(args)


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """What every submission carries besides run, step and URI."""
    config = _config(args)
    return {"phase": args.phase, "parent_run": args.parent_run, "parent_step": args.parent_step,
            "probe": args.probe, "config": config or None}


def _check_arguments(args: argparse.Namespace, loc) -> None:
    if args.revisions is not None:
        if loc.scheme != "hf":
            raise CliError(f"--revisions selects revisions of a Hub repository; {loc.uri()} is not one "
                           "(give hf://org/repo)", EXIT_USAGE)
        if "/" not in loc.container:
            raise CliError(f"{loc.uri()} names an organisation; give a repository: hf://org/repo", EXIT_USAGE)
        if loc.revision is not None:
            raise CliError(f"with --revisions, give the repository without a revision (hf://{loc.container}"
                           f"{'/' + loc.path if loc.path else ''}): the revisions are the ones listed", EXIT_USAGE)


# ------------------------------------------------------------------ finding checkpoints
@dataclass(frozen=True)
class Candidate:
    """A checkpoint found under the location: its step, name (directory or revision) and
    what is submitted (an absolute path, or the normalised URI)."""

    step: int
    name: str
    uri: str
    location: Any  # workers.locations.Location
    revision: bool = False


#: store errors about the location (or the machine's access to it), not about one checkpoint
def _location_errors():
    from layertrack.workers.errors import AccessDenied, HostRefused, InvalidCheckpointURI, StoreUnreachable

    return (AccessDenied, HostRefused, InvalidCheckpointURI, StoreUnreachable)


def _store_error(e: Exception, command: str, loc) -> CliError:
    """A store error as the command's one line (the missing extra named for this machine)."""
    text = str(e).replace("this worker cannot read", f"layertrack {command} lists {loc.uri()} on this machine "
                                                     "and cannot read")
    if isinstance(e, NotImplementedError):
        return CliError(f"{loc.uri()} cannot be listed ({e}); watch and backfill need a directory, an s3://, "
                        "gs:// or az:// prefix, or a Hub repository; submit the checkpoints one by one with "
                        "'layertrack submit'")
    return CliError(f"{text} ({getattr(e, 'code', type(e).__name__)})")


class Finder:
    """Lists the checkpoints under one location (one store client, kept)."""

    def __init__(self, loc, args: argparse.Namespace, command: str):
        from layertrack.workers.stores import open_store

        self.loc = loc
        self.command = command
        self.revisions = args.revisions
        self.allow_pickle = bool(args.allow_pickle)
        self.format = getattr(args, "format", None)
        default = DEFAULT_REVISION_PATTERN if args.revisions is not None else DEFAULT_STEP_PATTERN
        self.pattern: re.Pattern = args.step_pattern or re.compile(default)
        self._open = open_store
        self.store = open_store(loc)

    @property
    def local(self) -> bool:
        return self.loc.scheme == "file"

    def candidates(self) -> tuple[list[Candidate], list[str]]:
        """The checkpoints under the location in step order (one per step: the first name in
        sorted order), and notes on the names left out (no step in the name, a step again)."""
        if self.revisions is not None:
            names = sorted({name for name, _sha in self.store.revisions()
                            if fnmatch.fnmatchcase(name, self.revisions)})
        else:
            names = self.store.list_dirs()
        found: dict[int, Candidate] = {}
        notes: list[str] = []
        for name in sorted(names):
            step = _step_of(self.pattern, name)
            if step is None:
                if self.revisions is not None:
                    notes.append(f"skipped revision {name}: no step in its name (pattern {self.pattern.pattern!r})")
                continue
            if self.revisions is not None:
                loc = replace(self.loc, revision=name)
                cand = Candidate(step, name, loc.uri(), loc, revision=True)
            else:
                loc = self.loc.child(name)
                cand = Candidate(step, name, loc.path if self.local else loc.uri(), loc)
            if step in found:
                notes.append(f"skipped {name}: step {step} again (also {found[step].name})")
                continue
            found[step] = cand
        return [found[s] for s in sorted(found)], notes

    def complete(self, cand: Candidate) -> tuple:
        """What the checkpoint's files are now (for the settle check) when it is complete;
        a CheckpointError saying what is missing when it is not (yet). A Hub revision is a
        commit: complete as published."""
        from layertrack.workers.stores import checkpoint_files

        if cand.revision:
            return ()
        if self.local:
            from layertrack.workers.formats import native

            path = Path(cand.location.path)
            fmt = self.format or native.detect(path)  # litgpt copies a config.json beside its own files
            if fmt not in (None, "hf"):  # a training framework's layout: complete by its own commit marker
                return native.complete_files(path, fmt)
        store = self._open(cand.location)
        listing = store.list()
        files = checkpoint_files(listing, store, allow_pickle=self.allow_pickle)
        if self.local:
            from layertrack.workers.checkpoint import check_safetensors

            for o in files:
                if o.key.endswith(".safetensors"):
                    check_safetensors(Path(cand.location.path) / o.key)  # a shard still being written
        return tuple((o.key, o.size, o.version) for o in listing)


def _not_ready(e: Exception) -> bool:
    """Whether a store error while looking at one checkpoint means "not (yet) a complete
    checkpoint" rather than trouble with the location."""
    from layertrack.workers.errors import CheckpointError

    return isinstance(e, CheckpointError) and not isinstance(e, _location_errors())


# ------------------------------------------------------------------ submitting
def _fatal(e) -> bool:
    """An API refusal that every other checkpoint would get too: stop at once."""
    code = e.body.get("code") if isinstance(e.body, dict) else None
    return e.status in (401, 403) or code in ("checkpoint_outside_roots", "credentials_in_uri", "invalid_uri")


def _submit(c, run: str, cand: Candidate, fields: dict[str, Any]) -> tuple[dict, bool]:
    return c.submit_checked(run=run, step=cand.step, uri=cand.uri, **fields)


def _print_submission(run: str, cand: Candidate, job: dict, created: bool) -> None:
    if created:
        print(f"submitted  run {run}  step {cand.step}  {cand.uri}  job {job['id']}", flush=True)
    else:
        print(f"already submitted  run {run}  step {cand.step}  {cand.uri}  job {job['id']} ({job['status']})",
              flush=True)


# ------------------------------------------------------------------ backfill
def every_kth(cands: list, k: int) -> list:
    """The 1st, (k+1)-th, (2k+1)-th ... in step order."""
    return cands[::k]


def log_spaced(cands: list, n: int) -> list:
    """``n`` of ``cands`` (in step order) spread log-uniformly over the steps, the first and
    the last kept: for each of n targets equally spaced in log(1 + step), the nearest step not
    taken yet. All of them when there are at most ``n``."""
    if n >= len(cands):
        return list(cands)
    xs = [math.log1p(c.step) for c in cands]
    taken = {0, len(cands) - 1}
    for i in range(1, n - 1):
        target = xs[0] + i * (xs[-1] - xs[0]) / (n - 1)
        best = min((j for j in range(len(cands)) if j not in taken), key=lambda j: (abs(xs[j] - target), j))
        taken.add(best)
    return [cands[j] for j in sorted(taken)]


def cmd_backfill(args: argparse.Namespace) -> int:
    loc = _location(args.location)
    _check_arguments(args, loc)
    try:
        finder = Finder(loc, args, "backfill")
        cands, notes = finder.candidates()
        complete = []
        for cand in cands:
            try:
                finder.complete(cand)
            except Exception as e:
                if not _not_ready(e):
                    raise
                notes.append(f"skipped step {cand.step} {cand.uri}: not a complete checkpoint ({one_line(e)})")
                continue
            complete.append(cand)
    except CliError:
        raise
    except Exception as e:
        from layertrack.workers.errors import LayertrackError

        if isinstance(e, LayertrackError | NotImplementedError):
            raise _store_error(e, "backfill", loc) from None
        raise
    for note in notes:
        print(note, file=sys.stderr, flush=True)
    if not complete:
        what = f"revisions matching {args.revisions!r}" if args.revisions is not None else "checkpoint directories"
        raise CliError(f"no {what} under {loc.uri()} (names like {finder.pattern.pattern!r}); give "
                       "--step-pattern REGEX for other names")
    chosen = complete
    if args.every:
        chosen = every_kth(complete, args.every)
    elif args.log_spaced:
        chosen = log_spaced(complete, args.log_spaced)
    if args.dry_run:
        for cand in chosen:
            print(f"step {cand.step}  {cand.uri}")
        sys.stdout.flush()
        print(f"dry run: nothing was submitted; without --dry-run these {len(chosen)} checkpoint(s) go to run "
              f"{args.run}", file=sys.stderr, flush=True)
        return 0
    return _backfill(args, chosen)


@api_command
def _backfill_submit(c, args: argparse.Namespace) -> int | None:
    from ..client import ApiError, ServiceUnavailable

    fields = _fields(args)
    new = refused = 0
    for cand in args.chosen:
        try:
            job, created = _submit(c, args.run, cand, fields)
        except ServiceUnavailable:
            raise
        except ApiError as e:
            if _fatal(e):
                raise
            refused += 1
            print(f"refused  step {cand.step}  {cand.uri}: {one_line(e.detail)} ({error_code(e)})", file=sys.stderr,
                  flush=True)
            continue
        new += created
        _print_submission(args.run, cand, job, created)
    print(f"backfilled run {args.run}: {len(args.chosen) - refused} checkpoint(s), {new} new job(s)", flush=True)
    if refused:
        raise CliError(f"{refused} of {len(args.chosen)} checkpoint(s) were refused (listed above)")
    return None


def _backfill(args: argparse.Namespace, chosen: list[Candidate]) -> int:
    args.chosen = chosen
    return _backfill_submit(args)


# ------------------------------------------------------------------ watch
def default_state_file(url: str, run: str, loc_uri: str, fields: dict[str, Any]) -> Path:
    """``<data dir>/watch/<run>-<hash>.json``: one state per service, run, location and
    submission options (other options make other jobs, so they start afresh)."""
    from ..settings import get_settings

    key = json.dumps([url, run, loc_uri, fields], sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run)[:60]
    return get_settings().data_dir / "watch" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


class State:
    """The checkpoints a watch has submitted (URI -> step and job id), saved after each one
    (written to a temporary file, then renamed)."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.header = header
        self.submitted: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(path.read_text())
            self.submitted = dict(data.get("submitted") or {})
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise CliError(f"cannot read the watch state {path} ({type(e).__name__}: {e}); remove it (the service "
                           "answers a checkpoint submitted before with its job) or give another --state FILE") from None

    def add(self, uri: str, step: int, job_id: str) -> None:
        self.submitted[uri] = {"step": step, "job": job_id}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({**self.header, "submitted": self.submitted}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CliError(f"cannot write the watch state {self.path}: {e.strerror or e}; give a writable "
                           "--state FILE") from None


class Watcher:
    def __init__(self, c, args: argparse.Namespace, finder: Finder, state: State):
        self.c = c
        self.args = args
        self.finder = finder
        self.state = state
        self.fields = _fields(args)
        self.refused: set[str] = set()
        self.said: dict[str, str] = {}  # uri -> the last "waiting" reason printed
        self.submitted = 0
        self.refusals = 0
        self.trouble: str | None = None  # the last transient trouble printed

    def look(self) -> None:
        """One pass: list, check the new checkpoints, settle (local), submit."""
        cands, _notes = self.finder.candidates()
        new = [c for c in cands if c.uri not in self.state.submitted and c.uri not in self.refused]
        ready: list[tuple[Candidate, tuple]] = []
        for cand in new:
            snapshot = self._complete(cand)
            if snapshot is not None:
                ready.append((cand, snapshot))
        if ready and self.finder.local and self.args.settle > 0:
            time.sleep(self.args.settle)  # then look again: sizes still changing are a write in progress
            settled = []
            for cand, snapshot in ready:
                again = self._complete(cand)
                if again is None:
                    continue
                if again != snapshot:
                    self._waiting(cand, f"its files changed within {self.args.settle:g} s (still being written)")
                    continue
                settled.append((cand, again))
            ready = settled
        for cand, _snapshot in ready:
            self._submit(cand)

    def _complete(self, cand: Candidate) -> tuple | None:
        try:
            return self.finder.complete(cand)
        except Exception as e:
            if not _not_ready(e):
                raise
            self._waiting(cand, one_line(e))
            return None

    def _waiting(self, cand: Candidate, reason: str) -> None:
        if self.said.get(cand.uri) != reason:
            self.said[cand.uri] = reason
            print(f"waiting  step {cand.step}  {cand.uri}: {reason}", flush=True)

    def _submit(self, cand: Candidate) -> None:
        from ..client import ApiError, ServiceUnavailable

        try:
            job, created = _submit(self.c, self.args.run, cand, self.fields)
        except ServiceUnavailable:
            raise
        except ApiError as e:
            if _fatal(e):
                raise
            self.refused.add(cand.uri)
            self.refusals += 1
            print(f"refused  step {cand.step}  {cand.uri}: {one_line(e.detail)} ({error_code(e)}); not submitted "
                  "again until watch restarts", file=sys.stderr, flush=True)
            return
        self.state.add(cand.uri, cand.step, job["id"])
        self.submitted += created
        self.said.pop(cand.uri, None)
        _print_submission(self.args.run, cand, job, created)

    def transient(self, what: str) -> None:
        """Trouble that the next look may not have (the service or the store unreachable): said
        once while it lasts."""
        if what != self.trouble:
            self.trouble = what
            print(f"{what}; looking again in {self.args.interval:g} s", file=sys.stderr, flush=True)


@api_command
def _watch(c, args: argparse.Namespace) -> int | None:
    from layertrack.workers.errors import LayertrackError, StoreUnreachable

    from ..client import ServiceUnavailable

    loc = args.loc
    fields = _fields(args)
    path = Path(args.state).expanduser() if args.state else default_state_file(c.url, args.run, loc.uri(), fields)
    state = State(path, {"service": c.url, "run": args.run, "location": loc.uri()})
    shown = loc.path if loc.scheme == "file" else loc.uri()
    what = f"revisions matching {args.revisions!r} of" if args.revisions is not None else "new checkpoints under"
    watcher = None
    try:
        finder = Finder(loc, args, "watch")
        finder.candidates()  # a location that cannot be listed is an error at once
        watcher = Watcher(c, args, finder, state)
        when = "once" if args.once else f"every {args.interval:g} s (Ctrl-C stops)"
        print(f"watching {what} {shown} for run {args.run}, {when}; {len(state.submitted)} submitted before "
              f"(state {path})", flush=True)
        while True:
            try:
                watcher.look()
                watcher.trouble = None
            except ServiceUnavailable as e:
                if args.once:
                    raise
                watcher.transient(f"the service at {c.url} is unavailable ({one_line(e.detail)})")
            except StoreUnreachable as e:
                if args.once:
                    raise
                watcher.transient(f"{shown} cannot be listed now ({one_line(e)})")
            if args.once:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        n = watcher.submitted if watcher is not None else 0
        print(f"stopped watching {shown}: {n} checkpoint(s) submitted", flush=True)
        return 0
    except (LayertrackError, NotImplementedError) as e:
        raise _store_error(e, "watch", loc) from None
    if watcher.refusals:
        raise CliError(f"{watcher.refusals} checkpoint(s) were refused (listed above)")
    return None


def cmd_watch(args: argparse.Namespace) -> int:
    loc = _location(args.location)
    _check_arguments(args, loc)
    if loc.scheme == "file" and not os.path.isdir(loc.path):
        raise CliError(f"{loc.path} is not a directory (yet): give the directory training writes its checkpoints "
                       "into (checkpoint-1000/, ...)")
    args.loc = loc
    stop_on_ctrl_c_and_sigterm()  # however it was started (common.py)
    try:
        return _watch(args)
    except KeyboardInterrupt:  # before the watch began (opening the client)
        print("stopped watching", flush=True)
        return 0
