"""``layertrack up``: the API and its workers as the README starts them, with ``--roots``."""

from __future__ import annotations

import os
import socket
import subprocess

from services import AS_BACKGROUND_JOB, free_port, interrupt_group, layertrack_exe, ready, wait_until

EXE = layertrack_exe()


def clean_env(tmp_path) -> dict[str, str]:
    env = dict(os.environ, LAYERTRACK_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    for k in ("LAYERTRACK_DATABASE_URL", "LAYERTRACK_BROKER_URL", "LAYERTRACK_URL", "LAYERTRACK_TOKEN",
              "LAYERTRACK_CHECKPOINT_ROOTS"):
        env.pop(k, None)
    return env


def test_up_roots_reach_the_api_and_the_workers(tmp_path, tokenizer):
    from tiny_models import build_checkpoint

    roots = [tmp_path / "roots-a", tmp_path / "roots-b"]
    for r in roots:
        r.mkdir()
    inside = build_checkpoint(roots[1] / "run" / "step-5", "opt", tokenizer)
    outside = build_checkpoint(tmp_path / "elsewhere" / "step-5", "opt", tokenizer)
    env = clean_env(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_out, log_err = tmp_path / "up.out", tmp_path / "up.err"
    # started in a folder that holds neither checkpoint: the default root would refuse both
    with open(log_out, "wb") as out, open(log_err, "wb") as err:
        # as a script's background job: SIGINT ignored, which up restores (it stops on Ctrl-C below)
        up = subprocess.Popen([*AS_BACKGROUND_JOB, EXE, "up", "--port", str(port), "--roots", *map(str, roots)],
                              env=env, cwd=outside.parent, stdout=out, stderr=err, start_new_session=True)
    try:
        client_file = tmp_path / "data" / "client.json"
        printed = wait_until(lambda: "token" in log_out.read_text() and log_out.read_text(), 60,
                             what="layertrack up's lines")
        lines = printed.splitlines()
        assert lines[0].startswith(f"layertrack is up at {url}"), printed
        assert f"checkpoint roots: {roots[0]}, {roots[1]}" in lines, printed
        assert f"first API token saved to {client_file} (the CLI and the Python client read it from there)" in lines
        logs = tmp_path / "data" / "logs"
        assert f"logs in {logs}: api.log, worker-embedded.log, worker-embedded-hooks.log" in lines, printed
        wait_until(lambda: log_out.read_text().endswith("Ctrl-C stops it\n"), 60, what="up's last line")
        wait_until(lambda: ready(url), 60, what="layertrack up to answer /readyz")

        # the CLI finds the service and its token where up saved them
        done = subprocess.run([EXE, "submit", "roots", "5", str(inside), "--max-tokens", "600", "--seq-len", "64",
                               "--wait", "--timeout", "240"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr + log_err.read_text()[-3000:]
        assert "succeeded" in done.stdout.splitlines()[-1]  # the worker read it under its roots too
        refused = subprocess.run([EXE, "submit", "roots", "6", str(outside)], env=env, capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode == 3 and "outside the allowed checkpoint roots" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

        # the workers' banners and logs went to their files, the API's access log to api.log
        worker_log = (logs / "worker-embedded.log").read_text()
        assert "[tasks]" in worker_log and "embedded@" in worker_log and "layertrack.score" in worker_log
        assert "succeeded in" in worker_log, worker_log[-3000:]  # Celery's line for the job above
        assert "[queues]" in (logs / "worker-embedded-hooks.log").read_text()
        assert '"POST /v1/checkpoints HTTP/1.1" 202' in (logs / "api.log").read_text()
    finally:
        stopped = interrupt_group(up, timeout=60)
    assert stopped and up.returncode == 0, (up.returncode, log_err.read_text()[-3000:])
    # up printed only its own lines: no Celery banner, warning or shutdown line, no access log
    said = log_out.read_text() + log_err.read_text()
    for banner in ("[tasks]", "[queues]", "-------------- ", "celery", "SecurityWarning", "Warm shutdown",
                   "Uvicorn running", "HTTP/1.1"):
        assert banner not in said, (banner, said)
    assert log_err.read_text() == "" and len(log_out.read_text().splitlines()) == 7, said


def test_up_refuses_a_missing_root_a_bad_port_and_a_busy_port_in_one_line(tmp_path):
    env = clean_env(tmp_path)
    out = subprocess.run([EXE, "up", "--roots", str(tmp_path / "nope")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 3 and out.stderr.count("\n") == 1
    assert f"checkpoint root '{tmp_path / 'nope'}' is not a directory" in out.stderr
    out = subprocess.run([EXE, "up", "--port", "70000"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "a TCP port is 1 to 65535" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([EXE, "up", "--port", str(port)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "--port" in out.stderr


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the direct children of ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found.append((int(entry), f.read().replace(b"\0", b" ").decode()))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_up_says_on_stderr_when_a_worker_dies(tmp_path):
    import signal

    env = clean_env(tmp_path)
    port = free_port()
    log_out, log_err = tmp_path / "up.out", tmp_path / "up.err"
    with open(log_out, "wb") as out, open(log_err, "wb") as err:
        up = subprocess.Popen([EXE, "up", "--port", str(port), "--roots", str(tmp_path)], env=env, stdout=out,
                              stderr=err, start_new_session=True)
    try:
        wait_until(lambda: log_out.read_text().endswith("Ctrl-C stops it\n"), 60, what="up's last line")
        scoring = wait_until(lambda: [pid for pid, cmd in _children(up.pid) if "embedded@" in cmd], 60,
                             what="the scoring worker")
        os.kill(scoring[0], signal.SIGKILL)  # a worker that dies (the OOM killer, a crash)
        log = tmp_path / "data" / "logs" / "worker-embedded.log"
        line = wait_until(lambda: log_err.read_text(), 30, what="up to say the worker died")
        assert line == f"error: the scoring worker exited with code -9; its log: {log}\n", line
    finally:
        interrupt_group(up, timeout=60)
    assert log_err.read_text().count("\n") == 1  # said once, and not again when up stopped the other
