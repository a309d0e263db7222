"""Framework checkpoints scored as they are (workers/formats/native.py through
``layertrack score``): each equals the scores of the same weights saved as a transformers
checkpoint, for every metric. The DCP oracle is the full state dict FSDP2 itself gathered
(tests/writers/dcp_fsdp2.py); the nanoGPT one is its ckpt.pt mapped to GPT-2, whose forward
test_format_nanogpt.py proves equal to nanoGPT's own. Then what a user gets wrong: no
architecture, the wrong one, a directory of no known layout."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from layertrack.workers.errors import ArchitectureMissing
from layertrack.workers.formats import native
from safetensors.torch import load_file, save_file
from services import layertrack_exe
from test_format_nanogpt import mapped_gpt2, write_ckpt

EXE = layertrack_exe()
METRICS = ("linearity", "linearity_nores", "cosine", "norm_ratio", "anisotropy", "effective_rank",
           "massive_activation")
OPTIONS = ["--max-tokens", "384", "--seq-len", "64", "--json"]


def score(*args: str) -> dict:
    import subprocess

    r = subprocess.run([EXE, "score", *args, *OPTIONS], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def score_here(path) -> dict:
    """The transformers copy scored in this process (the library, as the CLI calls it)."""
    from layertrack.workers.scoring import ScoreConfig, score_checkpoint

    return json.loads(json.dumps(score_checkpoint(str(path), config=ScoreConfig(max_tokens=384, seq_len=64)).to_dict()))


def fails(*args: str) -> str:
    import subprocess

    r = subprocess.run([EXE, "score", *args, *OPTIONS], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0, r.stdout[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def same_scores(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert len(a["pairs"]) == len(b["pairs"]) > 0
    for p, q in zip(a["pairs"], b["pairs"], strict=True):
        for m in METRICS:
            if p.get(m) is None and q.get(m) is None:
                continue
            assert abs(p[m] - q[m]) <= tol * max(1.0, abs(q[m])), (m, p[m], q[m])


def dcp_llama_config() -> dict:
    from transformers import LlamaConfig
    from writers.dcp_fsdp2 import HIDDEN, LAYERS, VOCAB

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    return cfg.to_dict()


@pytest.fixture(scope="module")
def dcp_case(fsdp2, tokenizer, tmp_path_factory):
    """(the DCP step directory, the tokenizer's directory, the transformers copy of the oracle)."""
    tmp = tmp_path_factory.mktemp("native-dcp")
    tok = tmp / "tokenizer"
    tokenizer.save_pretrained(tok)
    hf = tmp / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dcp_llama_config()))
    save_file(load_file(fsdp2 / "oracle.safetensors"), str(hf / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(hf)
    return fsdp2 / "step-3", tok, hf


def test_a_dcp_checkpoint_scores_as_the_state_dict_fsdp2_gathered(dcp_case):
    step, tok, hf = dcp_case
    ours = score(str(step), "--model-config", str(hf / "config.json"), "--tokenizer", str(tok))
    theirs = score_here(hf)
    same_scores(ours, theirs)
    assert ours["model_type"] == "llama" and ours["plan"]["mode"] == "resident"
    # the plan of a model with AdamW state beside it counts the model alone
    model_bytes = sum(t.numel() * 4 for t in load_file(step.parent / "oracle.safetensors").values())
    assert ours["plan"]["weight_bytes"] == model_bytes
    assert sum(f.stat().st_size for f in step.iterdir()) > 2.5 * model_bytes


def test_a_dcp_checkpoint_without_its_architecture_fails_at_once_naming_the_option(dcp_case):
    step, tok, _ = dcp_case
    line = fails(str(step), "--tokenizer", str(tok))
    assert "(code architecture_missing)" in line and "--model-config" in line, line


def test_the_wrong_architecture_fails_with_both_lists(dcp_case, tmp_path):
    step, tok, _ = dcp_case
    cfg = dcp_llama_config() | {"num_hidden_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    line = fails(str(step), "--model-config", str(tmp_path), "--tokenizer", str(tok))
    assert "(code mapping_incomplete)" in line and "model.layers.2." in line, line


def test_a_directory_of_no_known_layout_lists_the_formats(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    line = fails(str(tmp_path))
    assert "(code not_a_model_directory)" in line and "no config.json" in line, line
    for name in native.FORMATS:
        assert f"{name}: " in line, line


def test_a_nanogpt_out_dir_scores_as_its_weights_mapped_to_gpt2(tokenizer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_ckpt(out / "ckpt.pt", bias=False, compiled=True)
    tok = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tok)
    line = fails(str(out))  # nanoGPT saves no tokenizer
    assert "(code tokenizer_missing)" in line and "--tokenizer" in line, line
    ours = score(str(out), "--tokenizer", str(tok))
    model, _ = mapped_gpt2(out / "ckpt.pt")
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    theirs = score_here(hf)
    same_scores(ours, theirs)
    assert ours["model_type"] == "gpt2"


def test_a_rewritten_dcp_checkpoint_has_a_new_identity(dcp_case, tmp_path):
    step, _, hf = dcp_case
    copy = tmp_path / "step"
    shutil.copytree(step, copy)
    first = native.open_native(copy, model_config=hf).fingerprint()
    assert native.open_native(copy, model_config=hf).fingerprint() == first  # untouched: the same
    data = copy / "__1_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one byte, same size
    st = os.stat(data)
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the modification time set back
    assert native.open_native(copy, model_config=hf).fingerprint() != first
    with pytest.raises(ArchitectureMissing):
        native.open_native(copy)


def test_tensors_read_are_the_models_not_the_optimizers(dcp_case):
    step, _, hf = dcp_case
    ckpt = native.open_native(step, model_config=hf)
    read: list[int] = []
    from layertrack.workers.formats import dcp

    index = dcp.read_metadata(step)
    ranges = dcp.local_ranges(step)

    def counting(file, offset, length):
        read.append(length)
        return ranges(file, offset, length)

    model = index.under("model.")
    state = {n: dcp.read_tensor(model[n], counting) for n in ckpt.tensor_bytes}
    assert sum(read) <= 1.1 * sum(t.numel() * t.element_size() for t in state.values())
    assert set(ckpt.state_dict()) == set(state)
    for name, t in ckpt.state_dict().items():
        torch.testing.assert_close(t, state[name], rtol=0, atol=0)


# ------------------------------------------------------------------ through the service
@pytest.fixture(scope="module")
def live(tmp_path_factory, redis_server):
    from services import live_service

    with live_service(tmp_path_factory.mktemp("native-live"), redis_server.new_url()) as svc:
        yield svc


def test_framework_checkpoints_are_jobs_like_any_other(live, dcp_case, tokenizer):
    """A DCP directory (with config.model_config and config.tokenizer) and a nanoGPT out dir
    (detected) submitted to the real service: the worker scores them as the CLI does; the same
    submission again is the same job; a DCP checkpoint without its architecture, a model_config
    outside the roots and a framework checkpoint in a store are refused at submission."""
    import uuid

    step, _, hf = dcp_case
    run = f"native-{uuid.uuid4().hex[:6]}"
    base = live.roots / run
    shutil.copytree(step, base / "step-3")
    shutil.copy(hf / "config.json", base / "llama.json")
    tokenizer.save_pretrained(base / "tok")
    (base / "nano").mkdir()
    write_ckpt(base / "nano" / "ckpt.pt", bias=True, compiled=False)
    cfg = {"max_tokens": 384, "seq_len": 64, "model_config": str(base / "llama.json"), "tokenizer": str(base / "tok")}
    with live.client() as c:
        job, created = c.submit_checked(run=run, step=3, uri=str(base / "step-3"), config=cfg)
        assert created
        done = c.wait(job["id"], timeout=300, poll=0.3)
        assert done["status"] == "succeeded", (done, live.logs())
        again, created = c.submit_checked(run=run, step=3, uri=str(base / "step-3"), config=cfg)
        assert not created and again["id"] == job["id"]
        cli = score(str(base / "step-3"), "--model-config", str(base / "llama.json"), "--tokenizer",
                    str(base / "tok"))
        got = {s["layer"]: s["values"][0] for s in c.scores(run, metric="linearity")["series"]}
        assert got == pytest.approx({p["layer"]: p["linearity"] for p in cli["pairs"]}, rel=1e-9, abs=1e-12)

        nano = c.wait(c.submit(run=run + "-nano", step=1, uri=str(base / "nano"),
                               config={"max_tokens": 384, "seq_len": 64, "tokenizer": str(base / "tok")})["id"],
                      timeout=300, poll=0.3)
        assert nano["status"] == "succeeded", (nano, live.logs())
        assert c.job(nano["id"])["config"].get("format") is None  # detected by the worker, not asked for

        from layertrack.service.client import ApiError

        with pytest.raises(ApiError) as e:
            c.submit(run=run, step=4, uri=str(base / "step-3"), config={"tokenizer": str(base / "tok")})
        assert e.value.code == "architecture_missing" and "model_config" in str(e.value), e.value
        with pytest.raises(ApiError) as e:
            c.submit(run=run, step=5, uri=str(base / "step-3"), config={**cfg, "model_config": "/etc/hostname"})
        assert e.value.code == "checkpoint_outside_roots", e.value
        with pytest.raises(ApiError) as e:
            c.submit(run=run, step=6, uri="s3://bucket/run/step-3", config={"format": "dcp"})
        assert e.value.code == "format_unsupported", e.value


def test_watch_submits_a_framework_checkpoint_once_its_framework_finished_writing_it(live, tokenizer, tmp_path):
    """`layertrack watch --once` over nanoGPT out dirs: a whole ckpt.pt is submitted (format
    detected, tokenizer given once on the command line for the series), one still being written
    (its zip archive cut) waits and is submitted when whole."""
    import subprocess
    import uuid

    run = f"watch-nano-{uuid.uuid4().hex[:6]}"
    watched = live.roots / run
    tokenizer.save_pretrained(live.roots / f"{run}-tok")
    (watched / "step-1").mkdir(parents=True)
    write_ckpt(watched / "step-1" / "ckpt.pt", bias=True, compiled=False)
    write_ckpt(tmp_path / "whole.pt", bias=False, compiled=True)
    data = (tmp_path / "whole.pt").read_bytes()
    (watched / "step-2").mkdir()
    (watched / "step-2" / "ckpt.pt").write_bytes(data[: len(data) - 200])  # the central directory not written yet
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERTRACK_")}
    env.update(LAYERTRACK_URL=live.url, LAYERTRACK_TOKEN=live.token, LAYERTRACK_DATA_DIR=str(tmp_path / "cli"))
    args = [EXE, "watch", str(watched), "--run", run, "--once", "--settle", "0.2", "--tokenizer",
            str(live.roots / f"{run}-tok"), "--max-tokens", "384", "--seq-len", "64"]

    def watch() -> str:
        r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
        return r.stdout

    out = watch()
    lines = out.splitlines()
    assert [ln.split()[4] for ln in lines if ln.startswith("submitted ")] == ["1"], out
    assert any(ln.startswith("waiting  step 2") and "not a whole torch.save archive" in ln for ln in lines), out
    (watched / "step-2" / "ckpt.pt").write_bytes(data)
    out = watch()
    assert [ln.split()[4] for ln in out.splitlines() if ln.startswith("submitted ")] == ["2"], out
    with live.client() as c:
        jobs = sorted(c.jobs(run=run), key=lambda j: j["step"])
        assert [j["step"] for j in jobs] == [1, 2]
        for j in jobs:
            assert j["config"]["tokenizer"] == os.path.realpath(live.roots / f"{run}-tok")
            done = c.wait(j["id"], timeout=300, poll=0.3)
            assert done["status"] == "succeeded", (done, live.logs())
