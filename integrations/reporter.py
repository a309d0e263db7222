"""Post checkpoints from a training loop without ever blocking or stopping it.

``Reporter`` is what the Trainer and Lightning callbacks use, and what a hand-written loop
can use directly::

    from layertrack.integrations import Reporter

    reporter = Reporter(run="my-run")            # URL/token: LAYERTRACK_URL / LAYERTRACK_TOKEN
    for step in range(...):
        ...
        if step % 1000 == 0:
            model.save_pretrained(f"ckpt/step-{step}")
            reporter.report(step, f"ckpt/step-{step}")   # returns at once
    reporter.close()                             # waits (bounded) for what is still queued

A background thread waits until the checkpoint directory is completely written (its config
and every weight file present, sizes unchanged between two looks), then posts it. When the
service cannot be reached the submission goes to a spool directory (one small JSON file per
checkpoint) and one warning is logged; the thread retries the spool every ``retry_every_s``
while training runs, at ``close()``, at the next ``Reporter`` start, and on
``layertrack spool flush``. Each spooled submission carries an Idempotency-Key, so sending
it twice creates one job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layertrack.service.client import ApiError, Client, ServiceUnavailable, discover
from layertrack.workers.vocabulary import FINAL_STATUSES

log = logging.getLogger("layertrack.integrations")


def default_spool_dir() -> Path:
    from layertrack.service.settings import get_settings

    return get_settings().data_dir / "spool"


def checkpoint_snapshot(path: Path, fmt: str | None = None) -> dict[str, tuple[int, int, int, int]] | None:
    """{file: (size, mtime_ns, ctime_ns, inode)} of a checkpoint directory that looks complete,
    else None (the stat part of the service's checkpoint identity: any rewrite changes it).

    Complete: config.json and the weights (model.safetensors, or an index and every shard
    it names; pytorch_model.bin likewise) are present. A training framework's checkpoint
    (``fmt``, else its layout: workers/formats/native.py) is complete when its framework's
    commit is there (DCP's ``.metadata``, a whole ``ckpt.pt`` or ``lit_model.pth`` archive and
    litgpt's ``model_config.yaml``).
    """
    if not path.is_dir():
        return None
    from layertrack.workers.errors import CheckpointError
    from layertrack.workers.formats import native  # stdlib only: no torch

    fmt = fmt or native.detect(path)
    if fmt not in (None, "hf"):
        try:
            files = native.complete_files(path, fmt)
            stats = {name: (path / name).stat() for name, _size, _mtime in files}
        except (CheckpointError, FileNotFoundError):
            return None
        return {name: (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for name, st in stats.items()}
    if not (path / "config.json").is_file():
        return None
    files = {p.name: p for p in path.iterdir() if p.is_file()}
    weights = None
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if single in files:
            weights = {single}
            break
        if index in files:
            try:
                weights = set(json.loads(files[index].read_text())["weight_map"].values()) | {index}
            except (ValueError, KeyError, OSError):
                return None  # the index is still being written
            break
    if weights is None or not weights <= files.keys():
        return None
    try:
        stats = {name: p.stat() for name, p in sorted(files.items())}
        return {name: (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for name, st in stats.items()}
    except FileNotFoundError:
        return None


def wait_complete(path: Path, *, timeout: float, settle: float = 0.5,
                  fmt: str | None = None) -> dict[str, tuple[int, int, int, int]] | None:
    """Wait until the directory is complete and unchanged over ``settle`` seconds."""
    deadline = time.monotonic() + timeout
    before = None
    while True:
        now = checkpoint_snapshot(path, fmt)
        if now is not None and now == before:
            return now
        if time.monotonic() > deadline:
            return None
        before = now
        time.sleep(settle)


@dataclass
class _Item:
    step: int
    path: Path
    body: dict[str, Any] = field(default_factory=dict)


class Reporter:
    """Posts checkpoints of one run to layertrack from a background thread.

    run: the run's name (stable across resumes: the callbacks keep it with the checkpoints).
    phase / parent_run / parent_step: for fine-tuning runs (the parent is the pretraining run
    and the step it starts from). config: scoring options (``max_tokens``, ``seq_len``, ...).
    path_map: ``{"/local/prefix": "/path/the/service/sees"}`` when the service mounts the
    checkpoints elsewhere. pull_scores: fetch the layer-mean scores of finished jobs so that
    ``finished()`` can hand them to the trainer's loggers.
    """

    def __init__(
        self,
        run: str,
        *,
        url: str | None = None,
        token: str | None = None,
        phase: str | None = None,
        parent_run: str | None = None,
        parent_step: int | None = None,
        config: dict[str, Any] | None = None,
        metrics: list[str] | None = None,
        path_map: dict[str, str] | None = None,
        spool_dir: str | os.PathLike | None = None,
        pull_scores: bool = False,
        retry_every_s: float = 30.0,
        complete_timeout_s: float = 600.0,
        poll_every_s: float = 5.0,
        timeout_s: float = 10.0,
        client: Client | None = None,
    ):
        self.run = run
        self.defaults = {"phase": phase, "parent_run": parent_run, "parent_step": parent_step,
                         "config": config, "metrics": metrics}
        self.path_map = dict(path_map or {})
        if client is None:
            found_url, found_token = discover()
            client = Client(url or found_url, token or found_token, timeout=timeout_s, retries=0)
        self.client = client
        self.url = client.url
        self.spool = Path(spool_dir) if spool_dir else default_spool_dir()
        self.pull_scores = pull_scores
        self.retry_every_s = retry_every_s
        self.complete_timeout_s = complete_timeout_s
        self.poll_every_s = poll_every_s
        self.submitted: dict[int, str] = {}  # step -> job id
        self._pending_jobs: dict[str, int] = {}
        self._finished: list[dict[str, Any]] = []
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._warned = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"layertrack-reporter-{run}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- public
    def report(self, step: int, path: str | os.PathLike, **fields: Any) -> None:
        """Queue checkpoint ``path`` of training step ``step``; returns immediately."""
        if self._closed:
            raise RuntimeError("this Reporter was closed")
        self._queue.put(_Item(int(step), Path(path).resolve(), fields))

    def finished(self) -> list[dict[str, Any]]:
        """Scores of jobs that finished since the last call (with ``pull_scores``):
        ``[{"step", "job_id", "status", "scores": {metric: layer mean}}]``, in step order."""
        with self._lock:
            out, self._finished = self._finished, []
        return sorted(out, key=lambda r: r["step"])

    def flush(self, timeout: float = 60.0) -> int:
        """Wait (at most ``timeout`` s) until queued checkpoints are posted or spooled, then try
        the spool once more; how many submissions are left in the spool."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        self.drain_spool()
        return len(self.spooled())

    def close(self, timeout: float = 60.0) -> int:
        """``flush``, then stop the thread. Returns how many submissions stay spooled."""
        left = self.flush(timeout)
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=5)
        self.client.close()
        return left

    def spooled(self) -> list[Path]:
        """This service's spooled submissions, oldest first."""
        if not self.spool.is_dir():
            return []
        out = []
        for p in self.spool.glob("*.json"):
            try:
                if json.loads(p.read_text()).get("url") == self.url:
                    out.append(p)
            except (OSError, ValueError):
                continue
        return sorted(out, key=lambda p: p.stat().st_mtime_ns)

    def drain_spool(self) -> int:
        """Post spooled submissions (oldest first) until one fails to reach the service; how
        many were delivered."""
        with self._drain_lock:
            return self._drain()

    def _drain(self) -> int:
        sent = 0
        for p in self.spooled():
            try:
                entry = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            try:
                job = self.client.submit(idempotency_key=entry["idempotency_key"], **entry["body"])
            except ServiceUnavailable:
                break
            except ApiError as e:
                self._reject(p, e)
                continue
            self._accepted(entry["body"]["step"], job)
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            sent += 1
        if sent:
            log.info("layertrack: delivered %d spooled checkpoint submission(s) to %s", sent, self.url)
            self._warned = False
        return sent

    # ---------------------------------------------------------------- the thread
    def _loop(self) -> None:
        next_retry = time.monotonic()
        next_poll = time.monotonic()
        while True:
            wait = min(next_retry, next_poll) - time.monotonic()
            try:
                item = self._queue.get(timeout=max(0.05, wait))
            except queue.Empty:
                item = False
            if item is None:
                self._queue.task_done()
                return
            try:
                if item:
                    self._post(item)
                if time.monotonic() >= next_retry:
                    if self.spooled():
                        self.drain_spool()
                    next_retry = time.monotonic() + self.retry_every_s
                if self.pull_scores and time.monotonic() >= next_poll:
                    self._poll()
                    next_poll = time.monotonic() + self.poll_every_s
            except Exception:  # never let the reporter die: training must go on
                log.exception("layertrack reporter error (training continues)")
            if item is not False:
                self._queue.task_done()

    def uri_for(self, path: Path) -> str:
        text = str(path)
        for local, remote in self.path_map.items():
            if text == local or text.startswith(local.rstrip("/") + "/"):
                return remote.rstrip("/") + text[len(local.rstrip("/")):]
        return text

    def _post(self, item: _Item) -> None:
        fmt = ((self.defaults.get("config") or {}) | (item.body.get("config") or {})).get("format")
        snap = wait_complete(item.path, timeout=self.complete_timeout_s, fmt=fmt)
        if snap is None:
            log.warning("layertrack: checkpoint %s still looks incomplete after %g s; posting it anyway",
                        item.path, self.complete_timeout_s)
        body = {"run": self.run, "step": item.step, "uri": self.uri_for(item.path),
                **{k: v for k, v in {**self.defaults, **item.body}.items() if v is not None}}
        # the key covers the files' sizes and times: a checkpoint rewritten after a resume is new
        key = "lt-" + hashlib.sha256(json.dumps([self.url, body, snap], sort_keys=True, default=str)
                                     .encode()).hexdigest()[:40]
        try:
            job = self.client.submit(idempotency_key=key, **body)
        except ServiceUnavailable as e:
            self._spool(body, key, e)
            return
        except ApiError as e:
            log.warning("layertrack refused checkpoint %s of run %s (step %d): %s", item.path, self.run,
                        item.step, e.detail)
            return
        self._accepted(item.step, job)
        if self.spooled():
            self.drain_spool()

    def _accepted(self, step: int, job: dict[str, Any]) -> None:
        with self._lock:
            self.submitted[step] = job["id"]
            if self.pull_scores and job.get("run") == self.run:
                self._pending_jobs[job["id"]] = step

    def _spool(self, body: dict[str, Any], key: str, error: Exception) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        entry = {"url": self.url, "idempotency_key": key, "body": body, "spooled_at": time.time()}
        fd, tmp = tempfile.mkstemp(dir=self.spool, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, self.spool / f"{key}.json")  # atomic: a crash leaves no half file
        if not self._warned:
            self._warned = True
            log.warning("layertrack at %s cannot be reached (%s); training continues, checkpoint submissions "
                        "are kept in %s and sent when it is back (or run 'layertrack spool flush')",
                        self.url, error, self.spool)

    def _reject(self, path: Path, error: ApiError) -> None:
        failed = self.spool / "rejected"
        failed.mkdir(parents=True, exist_ok=True)
        os.replace(path, failed / path.name)
        log.warning("layertrack refused spooled submission %s: %s (moved to %s)", path.name, error.detail, failed)

    def _poll(self) -> None:
        with self._lock:
            pending = dict(self._pending_jobs)
        for job_id, step in pending.items():
            try:
                job = self.client.job(job_id)
            except ServiceUnavailable:
                return
            if job["status"] not in FINAL_STATUSES:
                continue
            scores = {}
            if job["status"] == "succeeded":
                metrics = job["config"].get("metrics") or []
                for m in metrics:
                    t = self.client.trend(self.run, metric=m, from_step=step, to_step=step)
                    if t["values"] and t["values"][0] is not None:
                        scores[m] = t["values"][0]
            with self._lock:
                self._pending_jobs.pop(job_id, None)
                self._finished.append({"step": step, "job_id": job_id, "status": job["status"], "scores": scores})


def flush_spool(spool_dir: str | os.PathLike | None = None, *, url: str | None = None,
                token: str | None = None) -> tuple[int, int]:
    """Send the spooled submissions for one service (the CLI's ``layertrack spool flush``);
    (delivered, left)."""
    r = Reporter(run="spool", url=url, token=token, spool_dir=spool_dir, retry_every_s=3600)
    try:
        sent = r.drain_spool()
        return sent, len(r.spooled())
    finally:
        r.close(timeout=0)
