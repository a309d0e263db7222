"""The installed ``layertrack`` console script, run as a user runs it: local scoring, the
command list, the options' help, database commands and their errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
from layertrack.workers.scoring import ScoreConfig, score_checkpoint
from services import layertrack_exe

EXE = layertrack_exe()


def run(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300, env=env, **kw)


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The single line a failing command prints (asserting that it is one, with no traceback)."""
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def test_score_prints_a_table_with_the_flagged_last_pair(checkpoints):
    out = run("score", str(checkpoints("llama")), "--max-tokens", "800", "--seq-len", "64")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("model llama  blocks 3  d 32")
    assert "n_tokens 800" in lines[1]
    rows = [line for line in lines if line.strip().startswith(("0->1", "1->2", "2->3"))]
    assert len(rows) == 3 and rows[-1].endswith("*") and not rows[0].endswith("*")
    assert "final-norm output" in out.stdout


def test_score_json_equals_the_library_result(checkpoints):
    path = checkpoints("gpt2")
    out = run("score", path.as_uri(), "--max-tokens", "700", "--seq-len", "64", "--drop-first-token", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    want = score_checkpoint(str(path), config=ScoreConfig(max_tokens=700, seq_len=64, drop_first_token=True))
    assert got["n_tokens"] == 700 and got["d"] == 32
    assert [p["linearity"] for p in got["pairs"]] == pytest.approx(want.scores.metric("linearity"), abs=1e-12)
    assert [s["anisotropy"] for s in got["layers"]] == pytest.approx(want.scores.metric("anisotropy"), abs=1e-12)


def test_score_errors_are_one_clear_line(tmp_path, checkpoints):
    out = run("score", str(tmp_path / "missing"))
    assert out.returncode == 3
    assert one_line_error(out).startswith("error: checkpoint path") and "does not exist" in out.stderr
    out = run("score", str(checkpoints("llama")), "--max-tokens", "40", "--seq-len", "64")
    assert out.returncode == 3 and "only 40 probe tokens for hidden size d=32" in one_line_error(out)
    out = run("score", str(checkpoints("llama")), "--max-tokens", "-5")
    assert out.returncode == 2
    line = one_line_error(out)
    assert "must be at least 1" in line and "layertrack score --help" in line


def test_no_command_prints_the_command_list_and_exits_2():
    for args in ((), ("token",), ("webhook",)):
        out = run(*args)
        assert out.returncode == 2, args
        assert "Traceback" not in out.stderr and out.stdout.startswith(f"usage: layertrack {' '.join(args)}".strip())
    listed = run().stdout
    for command in ("score", "up", "submit", "status", "wait", "trend", "plot", "token", "migrate", "spool",
                    "webhook", "hook-source", "demo"):
        assert f"\n    {command}" in listed, command
    assert all(f"\n    {a}" in run("token").stdout for a in ("create", "list", "revoke"))


def test_python_dash_m_runs_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "layertrack.service.cli", "submit", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: layertrack submit")
    assert subprocess.run([sys.executable, "-m", "layertrack.service.cli"], capture_output=True,
                          timeout=60).returncode == 2


def _actions(parser: argparse.ArgumentParser, path: str = "layertrack"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_has_help_and_vocabulary_choices():
    from layertrack.service.cli import build_parser
    from layertrack.workers.vocabulary import DEFAULT_METRIC, KNOWN_METRICS, WEBHOOK_EVENTS

    actions = list(_actions(build_parser()))
    assert {f"{p} {a.dest}" for p, a in actions if not a.help} == set()
    # an option with a default names it (and its unit, where it has one) in its help
    for path, a in actions:
        if a.option_strings and a.default not in (None, False) and a.dest != "help_parser":
            assert "default" in a.help, f"{path} {a.option_strings[0]}: {a.help}"
    metric = {p: a for p, a in actions if a.dest == "metric"}
    assert set(metric) == {"layertrack trend", "layertrack plot", "layertrack export", "layertrack alert create"}
    for a in metric.values():
        assert tuple(a.choices) == KNOWN_METRICS
    # where a metric has a default, it is the vocabulary's (export: every metric; an alert: required)
    assert {p for p, a in metric.items() if a.default == DEFAULT_METRIC} == {"layertrack trend", "layertrack plot"}
    assert metric["layertrack export"].default is None and metric["layertrack alert create"].required
    [event] = [a for p, a in actions if p == "layertrack webhook create" and a.dest == "event"]
    assert tuple(event.choices) == WEBHOOK_EVENTS
    out = run("trend", "--help").stdout
    assert "{" + ",".join(KNOWN_METRICS) + "}" in out
    assert "seconds" in run("wait", "--help").stdout and "default: 3600" in run("wait", "--help").stdout


def test_the_cli_imports_no_torch():
    code = ("import sys, layertrack.service.cli as cli, layertrack.service.demo; cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_token_create_list_revoke_and_migrate(tmp_path):
    env = dict(os.environ, LAYERTRACK_DATABASE_URL=f"sqlite:///{tmp_path / 't.db'}",
               LAYERTRACK_DATA_DIR=str(tmp_path))

    def cli(*args):
        return run(*args, env=env)

    assert "no layertrack tables: run 'layertrack migrate'" in one_line_error(cli("token", "list"))
    assert "is up to date" in cli("migrate").stdout
    out = cli("token", "create", "ci")
    assert out.returncode == 0 and out.stdout.startswith("token 1 (ci): lt_")
    secret = out.stdout.split(": ", 1)[1].strip()
    listed = cli("token", "list").stdout
    assert "ci" in listed and secret[:10] in listed and secret not in listed and "active" in listed
    assert cli("token", "revoke", "1").stdout.strip() == "token 1 revoked"
    assert "revoked" in cli("token", "list").stdout
    out = cli("token", "revoke", "99")
    assert out.returncode == 3 and "no token with id 99" in one_line_error(out)


def test_database_failures_are_one_line(tmp_path):
    base = dict(os.environ, LAYERTRACK_DATA_DIR=str(tmp_path))
    out = run("migrate", env={**base, "LAYERTRACK_DATABASE_URL": "not a url"})
    assert out.returncode == 3 and "LAYERTRACK_DATABASE_URL is not a usable database URL" in one_line_error(out)
    # nothing listens on port 1
    out = run("token", "list", env={**base, "LAYERTRACK_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/x"})
    line = one_line_error(out)
    assert out.returncode == 3 and "cannot use the database at postgresql+psycopg://postgres@127.0.0.1:1/x" in line
    assert "LAYERTRACK_DATABASE_URL" in line


def test_a_device_this_machine_lacks_is_one_line_naming_the_devices_there_are(checkpoints):
    import torch

    ckpt = str(checkpoints("llama"))
    if torch.cuda.is_available():  # a GPU host: ask for one more GPU than it has
        n = torch.cuda.device_count()
        line = one_line_error(run("score", ckpt, "--device", f"cuda:{n}"))
        assert f"--device cuda:{n}: this machine has {n} CUDA device(s); devices here: cpu, cuda:0" in line
    else:
        out = run("score", ckpt, "--device", "cuda")
        line = one_line_error(out)
        assert out.returncode == 3
        assert line.startswith("error: --device cuda: this machine has no CUDA device (torch.cuda.is_available() "
                               "is false)"), line
        assert "devices here: cpu (code device_unavailable)" in line and "please report" not in line
    line = one_line_error(run("score", ckpt, "--device", "gpu0"))
    assert "--device gpu0: not a device name (cpu, cuda, cuda:N, mps); devices here: cpu" in line
    assert "please report" not in line


def test_output_into_a_pipe_closed_after_one_line_ends_quietly(tmp_path):
    # `layertrack spool list | head -1`: far more than a pipe buffer (64 KiB) of lines, so the
    # command is still writing when the reader goes away
    spool = tmp_path / "spool"
    spool.mkdir()
    for i in range(3000):
        body = {"run": "r", "step": i, "uri": f"/ckpts/run/checkpoint-{i}"}
        (spool / f"{i:05d}.json").write_text(json.dumps({"url": "http://127.0.0.1:8321", "body": body}))
    proc = subprocess.Popen([EXE, "spool", "list", "--dir", str(spool)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert first.startswith(b"http://127.0.0.1:8321  run r step 0")
    assert err == "" and code == 141, (code, err)  # 128 + SIGPIPE, as `yes | head` ends; nothing on stderr


def test_a_bad_saved_client_file_or_service_url_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LAYERTRACK_URL", "LAYERTRACK_TOKEN")}
    env["LAYERTRACK_DATA_DIR"] = str(tmp_path)
    saved = tmp_path / "client.json"
    for text, says in (("{not json", "cannot read the saved client file"),
                       ('["a list"]', "is not what 'layertrack up' writes")):
        saved.write_text(text)
        out = run("status", "abc", env=env)
        line = one_line_error(out)
        assert out.returncode == 3 and says in line and str(saved) in line and "layertrack up" in line, line
    saved.unlink()
    for url in ("http://[::1", "ftp://example.org", "localhost"):
        out = run("status", "abc", env={**env, "LAYERTRACK_URL": url})
        line = one_line_error(out)
        assert out.returncode == 3 and f"the service URL {url!r} (LAYERTRACK_URL) is not usable" in line, line


def test_a_setting_the_service_refuses_names_its_variable_in_one_line(tmp_path):
    env = dict(os.environ, LAYERTRACK_DATA_DIR=str(tmp_path), LAYERTRACK_WEBHOOK_MAX_ATTEMPTS="eight")
    out = run("token", "list", env=env)
    line = one_line_error(out)
    assert out.returncode == 3 and line.startswith("error: LAYERTRACK_WEBHOOK_MAX_ATTEMPTS: Input should be a valid "
                                                   "integer"), line
    assert "please report" not in line and "pydantic" not in line
