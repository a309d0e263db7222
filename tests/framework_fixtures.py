"""Checkpoints written by training frameworks' own code, built once per test session (per
pytest-xdist worker that needs them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WRITERS = Path(__file__).parent / "writers"


@pytest.fixture(scope="session")
def fsdp2(tmp_path_factory) -> Path:
    """``OUT`` with ``step-3/`` (a DCP checkpoint FSDP2 wrote on 2 gloo ranks after three AdamW
    steps, tests/writers/dcp_fsdp2.py) and ``oracle.safetensors`` (the full state dict FSDP2
    gathered), built once."""
    out = tmp_path_factory.mktemp("dcp-fsdp2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(WRITERS / "dcp_fsdp2.py"), str(out)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return out
