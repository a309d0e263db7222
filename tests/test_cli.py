"""The installed ``layertrack`` console script, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from layertrack.workers.scoring import ScoreConfig, score_checkpoint
from services import layertrack_exe

EXE = layertrack_exe()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300)


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
    assert out.stderr.strip().startswith("error: checkpoint path") and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    out = run("score", str(checkpoints("llama")), "--max-tokens", "40", "--seq-len", "64")
    assert out.returncode == 3 and "only 40 probe tokens for hidden size d=32" in out.stderr
    out = run("score", str(checkpoints("llama")), "--max-tokens", "-5")
    assert out.returncode == 2 and "must be at least 1" in out.stderr


def test_api_side_imports_no_torch():
    code = ("import sys, layertrack.service.cli, layertrack.service.app, layertrack.service.client, "
            "layertrack.workers.celery_app; app = layertrack.service.app.create_app(); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_token_create_list_revoke_and_migrate(tmp_path):
    env = dict(os.environ, LAYERTRACK_DATABASE_URL=f"sqlite:///{tmp_path / 't.db'}",
               LAYERTRACK_DATA_DIR=str(tmp_path))

    def cli(*args):
        return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=120)

    assert "is up to date" in cli("migrate").stdout
    out = cli("token", "create", "ci")
    assert out.returncode == 0 and out.stdout.startswith("token 1 (ci): lt_")
    secret = out.stdout.split(": ", 1)[1].strip()
    listed = cli("token", "list").stdout
    assert "ci" in listed and secret[:10] in listed and secret not in listed and "active" in listed
    assert cli("token", "revoke", "1").stdout.strip() == "token 1 revoked"
    assert "revoked" in cli("token", "list").stdout
    out = cli("token", "revoke", "99")
    assert out.returncode == 3 and "no token with id 99" in out.stderr
