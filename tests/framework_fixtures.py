"""Checkpoints written by training frameworks' own code, built once per test session (per
pytest-xdist worker that needs them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WRITERS = Path(__file__).parent / "writers"

# torchtitan cannot live in the project's environment (its `datasets<4.8` pins huggingface-hub<2, while
# transformers 5 needs >=2.4), so its writers run with these installed, without dependencies, into a
# private directory on PYTHONPATH: torchtitan plus what its import path needs that the project's
# environment lacks (triton, which it imports without declaring it; tyro and docstring-parser for its
# config; torchdata for its dataloader; spmd-types). Its other declared dependencies that the project
# lacks (datasets, torch_checkpointing, tensorboard, wandb, einops) are not imported on the writers' path.
TORCHTITAN_PACKAGES = ("torchtitan==0.3.0", "triton==3.9.0", "tyro==1.0.17", "docstring-parser==0.18.0",
                       "torchdata==0.11.0", "spmd-types==0.2.3")
# torchtitan 0.2.2 (the release before, whose names are ``attention.wq`` and ``output``) the same way:
# its import path needs triton, tyro and docstring-parser, torchdata, and also datasets (its llama3
# package imports its text dataloader; 5.2.0 accepts the environment's huggingface-hub 2.x) with what
# datasets imports that the environment lacks (dill, multiprocess, xxhash, pandas), and tensorboard
# (its metrics) with protobuf and absl-py (its event protos and summary writer). Its other declared
# dependencies (tokenizers, tomli, fsspec, einops, pillow) are the environment's or not imported on
# the writer's path.
TORCHTITAN_V02_PACKAGES = ("torchtitan==0.2.2", "triton==3.9.0", "tyro==1.0.17", "docstring-parser==0.18.0",
                           "torchdata==0.11.0", "datasets==5.2.0", "dill==0.4.0", "multiprocess==0.70.18",
                           "xxhash==3.6.0", "pandas==3.1.1", "tensorboard==2.20.0", "protobuf==7.36.2",
                           "absl-py==2.5.1")
# litgpt neither (it pins huggingface-hub<1.4): litgpt plus what its CLI's import path needs that the
# project's environment lacks (jsonargparse, and docstring-parser for the docstring options litgpt's
# CLI sets). Its other dependencies (lightning, torch, tokenizers, safetensors, psutil, tqdm) are the
# environment's; huggingface-hub is the environment's 2.x, which litgpt's import path accepts.
LITGPT_PACKAGES = ("litgpt==0.5.13", "jsonargparse==4.41.0", "docstring-parser==0.18.0")
_sites: dict[str, Path] = {}


def private_site(tmp_path_factory, name: str, packages: tuple[str, ...]) -> Path:
    """A private directory with ``packages`` installed into it without their dependencies, installed
    on first use in this process (so every fixture of a pytest-xdist worker that needs it shares one
    install)."""
    if name not in _sites:
        site = tmp_path_factory.mktemp(f"{name}-pkgs")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                            "--target", str(site), *packages], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-4000:]
        _sites[name] = site
    return _sites[name]


def torchtitan_site(tmp_path_factory) -> Path:
    """The private directory torchtitan is installed into."""
    return private_site(tmp_path_factory, "torchtitan", TORCHTITAN_PACKAGES)


def torchtitan_env(site: Path) -> dict[str, str]:
    """The environment of a torchtitan writer: ``site`` first on PYTHONPATH, one thread per rank."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


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


def run_torchtitan_writer(tmp_path_factory, writer: str, name: str, site: Path | None = None) -> Path:
    """``OUT``, a new directory, after tests/writers/``writer`` has run on 2 gloo ranks with torchtitan
    installed (``site``; torchtitan_site unless given)."""
    site = site or torchtitan_site(tmp_path_factory)
    out = tmp_path_factory.mktemp(name)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(WRITERS / writer), str(out)], env=torchtitan_env(site),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def titan(tmp_path_factory) -> Path:
    """``OUT`` with ``step-3/`` (the whole training state torchtitan 0.3.0's CheckpointManager wrote
    for a tiny Llama-3 after three steps of FSDP2 on 2 gloo ranks, tests/writers/titan_llama.py),
    ``config.json`` (the equivalent transformers LlamaConfig), ``oracle.safetensors`` (the full model
    state dict in torchtitan's names) and ``oracle_forward.safetensors`` (``tokens`` and torchtitan's
    ``logits`` on them), built once."""
    return run_torchtitan_writer(tmp_path_factory, "titan_llama.py", "titan-llama")


@pytest.fixture(scope="session")
def titan_qwen3(tmp_path_factory) -> Path:
    """As ``titan``, for a tiny dense Qwen-3 (tests/writers/titan_qwen3.py: q_norm/k_norm, cos/sin
    RoPE, head_dim 64 with dim 128 and 4 heads); ``config.json`` is the equivalent transformers
    Qwen3Config."""
    return run_torchtitan_writer(tmp_path_factory, "titan_qwen3.py", "titan-qwen3")


@pytest.fixture(scope="session")
def titan_v02(tmp_path_factory) -> Path:
    """``OUT`` with ``step-3/`` (the whole training state torchtitan 0.2.2's CheckpointManager wrote
    for a tiny Llama-3 after three steps of FSDP2 on 2 gloo ranks, tests/writers/titan_llama_v02.py:
    the names of the release before 0.3), ``config.json`` (the equivalent transformers LlamaConfig,
    with 0.2.2's llama3 RoPE scaling) and ``oracle_forward.safetensors`` (``tokens`` and torchtitan
    0.2.2's ``logits`` on them), built once."""
    site = private_site(tmp_path_factory, "torchtitan-v02", TORCHTITAN_V02_PACKAGES)
    return run_torchtitan_writer(tmp_path_factory, "titan_llama_v02.py", "titan-llama-v02", site)


@pytest.fixture(scope="session")
def litgpt_ckpt(tmp_path_factory) -> Path:
    """``OUT`` after ``litgpt pretrain`` (litgpt 0.5.13, installed into a private directory) trained a
    tiny Llama with grouped-query attention three steps on CPU (tests/writers/litgpt_llama.py):
    ``step-00000001/`` to ``step-00000003/`` and ``final/`` (``lit_model.pth`` with the model,
    AdamW's state, the data loader's state and the counters; ``model_config.yaml``;
    ``hyperparameters.yaml``), ``oracle_forward.safetensors`` (``tokens`` and litgpt's own
    ``logits`` for step 3), and the untrained variants ``pythia/`` and ``llama3/`` beside
    ``pythia.forward.safetensors`` and ``llama3.forward.safetensors``, built once."""
    site = private_site(tmp_path_factory, "litgpt", LITGPT_PACKAGES)
    out = tmp_path_factory.mktemp("litgpt")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    # torch.compile (pretrain compiles the model) compiles in this process, not in a pool of workers
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1",
           "JSONARGPARSE_DEPRECATION_WARNINGS": "off"}
    r = subprocess.run([sys.executable, str(WRITERS / "litgpt_llama.py"), str(out)], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out
