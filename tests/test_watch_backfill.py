"""``layertrack watch`` and ``layertrack backfill``, run as a user runs them (the installed
console script) against a live service (API server and a Celery worker on PostgreSQL and a
private Redis), with checkpoints in a local directory, in moto's S3 server on loopback
(tests/moto_s3.py) and on a Hub on loopback (tests/hub_server.py). The CLI lists the
locations itself, with the standard AWS_* and HF_ENDPOINT variables of its own environment.

- watch --once on a local directory: three checkpoints written one after another (one moved
  in, one linked in, the last written slowly: the index first, then the shards, the last one
  half written, then another file still growing) give exactly three jobs, the partial one
  only once complete; running it again (a restart) gives none more, and without its state
  file the service answers with the jobs it has;
- watch following a directory until Ctrl-C (exit 0, one line), and stopping on SIGTERM, both
  started with SIGINT ignored as a script's background job is;
- the same three-checkpoint sequence on an S3 prefix;
- backfill --dry-run of a directory (every 2nd, log-spaced): the exact list, nothing sent;
- backfill of three stepN revisions of a Hub repository: a three-step run in step order, each
  job with its resolved revision.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from services import AS_BACKGROUND_JOB, layertrack_exe, stop_child, store_service, wait_until
from stores_fixtures import hub_env, hub_srv, s3_server  # noqa: F401  (fixtures)

EXE = layertrack_exe()
BUCKET = "series-ckpts"
PREFIX = "runs"
HUB_ORG = "lt-series"
#: small scoring jobs: the worker scores what the tests submit while they go on
SCORING = ["--max-tokens", "600", "--seq-len", "64"]


@pytest.fixture(scope="module")
def s3(s3_server):  # noqa: F811
    s3_server.client().create_bucket(Bucket=BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def live(tmp_path_factory, pg_url, redis_server, s3, hub_srv):  # noqa: F811
    tmp = tmp_path_factory.mktemp("series")
    env = {**s3.env(), **hub_env(hub_srv, tmp / "hf-home-worker")}
    with store_service(tmp, redis_server.new_url(), [f"s3://{BUCKET}/{PREFIX}/", f"hf://{HUB_ORG}/"], env,
                       db_url=pg_url) as svc:
        yield svc


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer) -> list[Path]:
    """Three tiny Llama checkpoints (different weights), each in several safetensors shards."""
    from tiny_models import build_checkpoint

    root = tmp_path_factory.mktemp("series-src")
    made = [build_checkpoint(root / f"ckpt{i}", "llama", tokenizer, seed=20 + i, max_shard_size="60KB")
            for i in range(3)]
    assert all(len(shards(p)) >= 3 for p in made), [shards(p) for p in made]
    return made


@pytest.fixture()
def env(live, s3, hub_srv, tmp_path) -> dict[str, str]:  # noqa: F811
    """The CLI's environment: the service, its own data directory (watch states), the S3
    server and the Hub, through the standard variables."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERTRACK_", "AWS_", "HF_"))}
    out.update(LAYERTRACK_URL=live.url, LAYERTRACK_TOKEN=live.token, LAYERTRACK_DATA_DIR=str(tmp_path / "cli-data"),
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               **hub_env(hub_srv, tmp_path / "hf-home"), **s3.env())
    return out


def uid() -> str:
    return uuid.uuid4().hex[:8]


def shards(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("model-*.safetensors"))


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300, env=env)


def ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def submitted(out: subprocess.CompletedProcess, prefix: str = "submitted ") -> list[tuple[int, str]]:
    """(step, URI) of each line ``submitted  run R  step N  URI  job ID`` (or with another prefix)."""
    found = []
    for line in out.stdout.splitlines():
        if line.startswith(prefix):
            words = line.split()
            i = words.index("step")
            found.append((int(words[i + 1]), words[i + 2]))
    return found


def jobs_of(live, run: str) -> list[dict]:
    """The run's jobs in the order they were queued ([] before the run exists)."""
    from layertrack.service.client import ApiError

    with live.client() as c:
        try:
            jobs = c.jobs(run=run, limit=500)
        except ApiError as e:
            if e.status == 404:
                return []
            raise
    return sorted(jobs, key=lambda j: (j["queued_at"], j["step"]))


def copy_files(src: Path, dst: Path, names) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)


# ------------------------------------------------------------------ watch: a local directory
def test_watch_once_on_a_local_directory_submits_each_complete_checkpoint_once(live, built, env, tmp_path):
    run = f"watch-local-{uid()}"
    watched = live.roots / run
    staging = live.roots / f"staging-{run}"  # beside it, under the same root
    watched.mkdir()
    args = ["watch", str(watched), "--run", run, "--once", "--settle", "0.5", *SCORING]

    # checkpoint-1000 written elsewhere and moved in whole; checkpoint-2000 linked in
    shutil.copytree(built[0], staging / "a")
    os.rename(staging / "a", watched / "checkpoint-1000")
    shutil.copytree(built[1], staging / "b")
    os.symlink(staging / "b", watched / "checkpoint-2000")
    # checkpoint-3000 written slowly: config.json and the index first, no shard yet
    third, src = watched / "checkpoint-3000", built[2]
    copy_files(src, third, ["config.json", "model.safetensors.index.json"])
    (watched / "runs").mkdir()  # not a checkpoint: never looked at
    out = ok(cli(*args, env=env))
    assert submitted(out) == [(1000, str(watched / "checkpoint-1000")), (2000, str(watched / "checkpoint-2000"))]
    assert out.stdout.splitlines()[0].startswith(f"watching new checkpoints under {watched} for run {run}, once")
    waiting = [line for line in out.stdout.splitlines() if line.startswith("waiting  step 3000")]
    assert len(waiting) == 1 and "not there (yet)" in waiting[0], out.stdout
    jobs = jobs_of(live, run)
    assert [j["step"] for j in jobs] == [1000, 2000]
    # the service stored the directories as real paths: the one linked in is its target
    assert [j["uri"] for j in jobs] == [os.path.realpath(watched / "checkpoint-1000"), os.path.realpath(staging / "b")]

    # every shard but the last, and the last half written: not complete yet
    names = shards(src)
    copy_files(src, third, names[:-1])
    data = (src / names[-1]).read_bytes()
    (third / names[-1]).write_bytes(data[: len(data) // 2])
    out = ok(cli(*args, env=env))
    assert submitted(out) == [], out.stdout
    assert "not a valid safetensors file" in out.stdout and names[-1] in out.stdout, out.stdout
    assert len(jobs_of(live, run)) == 2

    # the weights complete, but another file is still being written: sizes change between two looks
    (third / names[-1]).write_bytes(data)
    copy_files(src, third, [p.name for p in src.iterdir() if not (third / p.name).exists()])  # the tokenizer
    stop = threading.Event()

    def write_optimizer_state() -> None:
        with open(third / "optimizer.pt", "ab") as f:
            while not stop.is_set():
                f.write(b"\0" * 4096)
                f.flush()
                stop.wait(0.02)

    writer = threading.Thread(target=write_optimizer_state, daemon=True)
    writer.start()
    try:
        out = ok(cli(*args, env=env))
    finally:
        stop.set()
        writer.join()
    assert submitted(out) == [], out.stdout
    assert "its files changed within 0.5 s (still being written)" in out.stdout, out.stdout
    assert len(jobs_of(live, run)) == 2

    # now complete and settled: submitted, once
    out = ok(cli(*args, env=env))
    assert submitted(out) == [(3000, str(third))], out.stdout
    jobs = jobs_of(live, run)
    assert [j["step"] for j in jobs] == [1000, 2000, 3000]

    # a restart: the state file says what was submitted; nothing is sent again
    out = ok(cli(*args, env=env))
    assert submitted(out) == [] and submitted(out, "already submitted") == [], out.stdout
    assert "2 submitted before" not in out.stdout and "3 submitted before" in out.stdout
    # without the state file, the service answers each with the job it has
    out = ok(cli(*args, "--state", str(tmp_path / "fresh-state.json"), env=env))
    assert submitted(out) == []
    assert [s for s, _ in submitted(out, "already submitted")] == [1000, 2000, 3000], out.stdout
    assert [j["id"] for j in jobs_of(live, run)] == [j["id"] for j in jobs]


class _Watch:
    """``layertrack watch`` as a background job of a script starts: SIGINT ignored
    (services.AS_BACKGROUND_JOB), whatever way the suite was started. Its stdout lines are
    collected by a thread; its stderr goes to a file."""

    def __init__(self, args: list[str], env: dict[str, str], stderr: Path):
        self.lines: list[str] = []
        self.stderr_path = stderr
        with open(stderr, "w") as err:
            self.proc = subprocess.Popen([*AS_BACKGROUND_JOB, EXE, "watch", *args], stdout=subprocess.PIPE,
                                         stderr=err, text=True, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def started(self) -> None:
        wait_until(lambda: any(line.startswith("watching") for line in self.lines), 60, what="watch to start")

    def stop(self, sig: int) -> bool:
        """``sig`` to watch; whether it ended on it (else it was killed)."""
        stopped = stop_child(self.proc, sig, 60, read_pipes=False)
        self.reader.join(timeout=10)
        self.proc.stdout.close()
        return stopped

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


def test_watch_follows_a_directory_until_ctrl_c(live, built, env, tmp_path):
    run = f"watch-follow-{uid()}"
    watched = live.roots / run
    watched.mkdir()
    watch = _Watch([str(watched), "--run", run, "--interval", "0.2", "--settle", "0.2", *SCORING], env,
                   tmp_path / "watch.err")
    lines = watch.lines
    try:
        watch.started()
        shutil.copytree(built[0], live.roots / f"staging-{run}")
        os.rename(live.roots / f"staging-{run}", watched / "step_100")
        wait_until(lambda: len(jobs_of(live, run)) == 1, 60, what="the first checkpoint's job")

        second, src = watched / "step_200", built[1]
        copy_files(src, second, ["config.json", "model.safetensors.index.json"])
        wait_until(lambda: any(line.startswith("waiting  step 200") for line in lines), 60,
                   what="watch to see the second checkpoint incomplete")
        names = shards(src)
        for name in names:
            assert len(jobs_of(live, run)) == 1  # never submitted before its last shard is there
            copy_files(src, second, [name])
        wait_until(lambda: len(jobs_of(live, run)) == 2, 60, what="the second checkpoint's job")
    finally:
        stopped = watch.stop(signal.SIGINT)  # started with SIGINT ignored: watch restores it
    assert stopped, ("watch did not stop on SIGINT", lines, watch.stderr)
    assert watch.proc.returncode == 0, (watch.proc.returncode, lines, watch.stderr)
    assert watch.stderr == "", watch.stderr
    assert lines[-1] == f"stopped watching {watched}: 2 checkpoint(s) submitted", lines
    assert [line.split()[4] for line in lines if line.startswith("submitted ")] == ["100", "200"], lines
    assert [j["step"] for j in jobs_of(live, run)] == [100, 200]


def test_watch_stops_on_sigterm(live, env, tmp_path):
    run = f"watch-term-{uid()}"
    watched = live.roots / run
    watched.mkdir()
    watch = _Watch([str(watched), "--run", run, "--interval", "0.2"], env, tmp_path / "watch.err")
    try:
        watch.started()
    finally:
        stopped = watch.stop(signal.SIGTERM)
    assert stopped, ("watch did not stop on SIGTERM", watch.lines, watch.stderr)
    assert watch.proc.returncode == 0, (watch.proc.returncode, watch.lines, watch.stderr)
    assert watch.stderr == "" and watch.lines[-1] == f"stopped watching {watched}: 0 checkpoint(s) submitted", (
        watch.lines, watch.stderr)


# ------------------------------------------------------------------ watch: an S3 prefix
def test_watch_once_on_an_s3_prefix_submits_each_complete_checkpoint_once(live, s3, built, env):
    run = f"watch-s3-{uid()}"
    key_prefix = f"{PREFIX}/{run}"
    location = f"s3://{BUCKET}/{key_prefix}/"
    args = ["watch", location, "--run", run, "--once", *SCORING]
    s3.upload_dir(BUCKET, f"{key_prefix}/checkpoint-1000", built[0])
    s3.upload_dir(BUCKET, f"{key_prefix}/checkpoint-2000", built[1])
    names = shards(built[2])
    # the third being uploaded: everything but the shards after the first
    s3.upload_dir(BUCKET, f"{key_prefix}/checkpoint-3000", built[2], skip=names[1:])
    s3.client().put_object(Bucket=BUCKET, Key=f"{key_prefix}/logs/events.txt", Body=b"not a checkpoint")

    out = ok(cli(*args, env=env))
    uri = f"s3://{BUCKET}/{key_prefix}"
    assert submitted(out) == [(1000, f"{uri}/checkpoint-1000"), (2000, f"{uri}/checkpoint-2000")], out.stdout
    waiting = [line for line in out.stdout.splitlines() if line.startswith("waiting  step 3000")]
    assert len(waiting) == 1 and names[1] in waiting[0], out.stdout
    assert [j["step"] for j in jobs_of(live, run)] == [1000, 2000]

    c = s3.client()
    for name in names[1:-1]:
        c.put_object(Bucket=BUCKET, Key=f"{key_prefix}/checkpoint-3000/{name}", Body=(built[2] / name).read_bytes())
    out = ok(cli(*args, env=env))
    assert submitted(out) == [] and names[-1] in out.stdout, out.stdout
    c.put_object(Bucket=BUCKET, Key=f"{key_prefix}/checkpoint-3000/{names[-1]}",
                 Body=(built[2] / names[-1]).read_bytes())
    out = ok(cli(*args, env=env))
    assert submitted(out) == [(3000, f"{uri}/checkpoint-3000")], out.stdout

    out = ok(cli(*args, env=env))  # a restart
    assert submitted(out) == [] and "3 submitted before" in out.stdout, out.stdout
    jobs = jobs_of(live, run)
    assert [(j["step"], j["uri"]) for j in jobs] == [(s, f"{uri}/checkpoint-{s}") for s in (1000, 2000, 3000)]


# ------------------------------------------------------------------ backfill
def test_backfill_dry_run_of_a_directory_lists_the_subset_and_sends_nothing(live, built, env):
    run = f"backfill-dir-{uid()}"
    root = live.roots / run
    names = {0: "checkpoint-0", 10: "checkpoint-10", 20: "step_20", 100: "global_step100", 1000: "checkpoint-1000",
             5000: "checkpoint-5000"}
    for name in names.values():
        shutil.copytree(built[0], root / name, copy_function=os.link)
    copy_files(built[0], root / "checkpoint-7000", ["config.json"])  # incomplete: left out
    (root / "logs").mkdir()
    offline = {**env, "LAYERTRACK_URL": "http://127.0.0.1:9"}  # a dry run needs no service

    out = ok(cli("backfill", str(root), "--run", run, "--every", "2", "--dry-run", env=offline))
    assert out.stdout.splitlines() == [f"step {s}  {root / names[s]}" for s in (0, 20, 1000)]
    assert "skipped step 7000" in out.stderr and "config.json but no weights" in out.stderr, out.stderr
    # it says, last, that it sent nothing (on stderr: stdout stays the list)
    assert out.stderr.splitlines()[-1] == (f"dry run: nothing was submitted; without --dry-run these 3 checkpoint(s) "
                                           f"go to run {run}"), out.stderr

    out = ok(cli("backfill", str(root), "--run", run, "--log-spaced", "3", "--dry-run", env=offline))
    assert out.stdout.splitlines() == [f"step {s}  {root / names[s]}" for s in (0, 100, 5000)]
    out = ok(cli("backfill", str(root), "--run", run, "--dry-run", "--step-pattern", r"checkpoint-(\d+)",
                 env=offline))
    assert out.stdout.splitlines() == [f"step {s}  {root / names[s]}" for s in (0, 10, 1000, 5000)]
    assert jobs_of(live, run) == []


def test_backfill_of_hub_revisions_gives_a_run_in_step_order_with_resolved_revisions(live, hub_srv, built, env):  # noqa: F811
    from hub_server import Repo, files_of

    name = f"pythia-like-{uid()}"
    repo = Repo()
    repo.commit({"README.md": b"a model"}, branch="main")
    shas = {}
    # published out of order; by name, step500 sorts after step2000
    for step, src in ((2000, built[2]), (500, built[0]), (1000, built[1])):
        shas[step] = repo.commit(files_of(src), branch=f"step{step}")
    repo.tags["v1.0"] = shas[2000]  # matches no --revisions pattern below
    hub_srv.repos[f"{HUB_ORG}/{name}"] = repo
    run = f"hub-{name}"
    location = f"hf://{HUB_ORG}/{name}"

    out = ok(cli("backfill", location, "--run", run, "--revisions", "step*", *SCORING, env=env))
    want = [(s, f"{location}@step{s}") for s in (500, 1000, 2000)]
    assert submitted(out) == want, out.stdout
    assert out.stdout.splitlines()[-1] == f"backfilled run {run}: 3 checkpoint(s), 3 new job(s)"

    def finished():
        jobs = jobs_of(live, run)
        assert not [j for j in jobs if j["status"] in ("failed", "cancelled")], (jobs, live.logs())
        return jobs if len(jobs) == 3 and all(j["status"] == "succeeded" for j in jobs) else None

    jobs = wait_until(finished, 300, what="the three Hub revisions to be scored")
    assert [(j["step"], j["uri"]) for j in jobs] == want  # queued in step order
    assert [j["resolved_revision"] for j in jobs] == [shas[s] for s in (500, 1000, 2000)]
    with live.client() as c:
        assert c.trend(run, metric="linearity")["steps"] == [500, 1000, 2000]
        info = c.run(run)
    assert info["n_checkpoints"] == 3 and info["last_step"] == 2000

    again = ok(cli("backfill", location, "--run", run, "--revisions", "step*", *SCORING, env=env))
    assert submitted(again) == [] and submitted(again, "already submitted") == want, again.stdout
    assert len(jobs_of(live, run)) == 3
