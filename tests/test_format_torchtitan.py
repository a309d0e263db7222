"""torchtitan's checkpoints (workers/formats/torchtitan.py): the ``step-N/`` DCP directory
torchtitan's own CheckpointManager wrote after three FSDP2 training steps on 2 gloo ranks
(tests/writers/titan_llama.py, the ``titan`` fixture; tests/writers/titan_qwen3.py, the
``titan_qwen3`` fixture), read without conversion. The oracle is torchtitan's own forward: the
transformers Llama (Qwen-3) built from the checkpoint gives its logits. Then the names of the
release before (``attention.wq``, ``output``), in a checkpoint torchtitan 0.2.2 wrote itself
(tests/writers/titan_llama_v02.py, the ``titan_v02`` fixture) and in 0.3.0's tensors renamed, the
bytes read (the model's, not the optimizer's), and what a user gets wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from layertrack.workers.errors import ArchitectureMissing, CheckpointIncomplete, FormatUnsupported, MappingIncomplete
from layertrack.workers.formats import dcp, native
from safetensors.torch import load_file
from test_native_scoring import fails, same_scores, score, score_here


@pytest.fixture(scope="module")
def titan_case(titan, tokenizer, tmp_path_factory):
    """(torchtitan's step directory, the transformers config.json a user writes for it, the
    tokenizer's directory)."""
    tmp = tmp_path_factory.mktemp("titan-case")
    tok = tmp / "tokenizer"
    tokenizer.save_pretrained(tok)
    return titan / "step-3", titan / "config.json", tok


def logits_of(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


@pytest.mark.parametrize("written, architecture", [("titan", "LlamaForCausalLM"),
                                                   ("titan_qwen3", "Qwen3ForCausalLM")])
def test_the_checkpoint_gives_torchtitans_own_logits(written, architecture, request):
    """Llama's query/key rows permuted (complex RoPE), Qwen-3's not (cos/sin RoPE) and its
    q_norm/k_norm taken as they are: swapping those two, or permuting Qwen-3's rows as Llama's,
    moves its logits by 3e-3 and 0.2 (at most), far outside the tolerance."""
    out = request.getfixturevalue(written)
    step = out / "step-3"
    ckpt = native.open_native(step, model_config=out / "config.json")
    assert ckpt.format == "torchtitan" and native.detect(step) == "dcp"
    model = native.build_model(ckpt, dtype=torch.float32, with_lm_head=True)
    assert type(model).__name__ == architecture
    oracle = load_file(out / "oracle_forward.safetensors")
    torch.testing.assert_close(logits_of(model, oracle["tokens"]), oracle["logits"], rtol=1e-4, atol=1e-4)


def test_a_qwen3_checkpoint_read_as_llama_is_refused(titan_qwen3, tmp_path):
    """Given a LlamaConfig of the same sizes, q_norm/k_norm would be dropped: it is said instead."""
    cfg = json.loads((titan_qwen3 / "config.json").read_text())
    llama = cfg | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (tmp_path / "llama.json").write_text(json.dumps(llama))
    ckpt = native.open_native(titan_qwen3 / "step-3", model_config=tmp_path / "llama.json")
    with pytest.raises(MappingIncomplete, match=r"nothing uses: layers\.0\.attention\.k_norm\.weight"):
        native.build_model(ckpt)


def test_only_the_models_tensors_are_read(titan, titan_case):
    step, config, _ = titan_case
    ckpt = native.open_native(step, model_config=config)
    index = dcp.read_metadata(step)
    assert any(n.startswith("optimizer.") for n in index.tensors), sorted(index.tensors)[:20]
    ranges = dcp.local_ranges(step)
    read: list[int] = []

    def counting(file, offset, length):
        read.append(length)
        return ranges(file, offset, length)

    state = {n: dcp.read_tensor(index.tensors[n], counting) for n in ckpt.tensor_bytes}
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert sum(read) <= 1.1 * model_bytes
    assert sum(f.stat().st_size for f in step.iterdir()) > 2.5 * model_bytes  # AdamW's two moments beside it
    oracle = load_file(titan / "oracle.safetensors")
    assert set(state) == set(oracle)
    for name, t in state.items():
        torch.testing.assert_close(t, oracle[name], rtol=0, atol=0)


def test_a_checkpoint_the_release_before_wrote_gives_its_own_logits(titan_v02):
    """torchtitan 0.2.2's own training checkpoint (separate ``wq``/``wk``/``wv``, ``output``, llama3
    RoPE scaling recorded in config.json) gives 0.2.2's own forward."""
    step = titan_v02 / "step-3"
    names = set(dcp.read_metadata(step).tensors)
    assert {"layers.0.attention.wq.weight", "layers.1.attention.wv.weight", "output.weight"} <= names
    assert not any("qkv_linear" in n or n.startswith("lm_head.") for n in names), sorted(names)
    assert any(n.startswith("optimizer.") for n in names)
    ckpt = native.open_native(step, model_config=titan_v02 / "config.json")
    assert ckpt.format == "torchtitan"
    model = native.build_model(ckpt, dtype=torch.float32, with_lm_head=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    oracle = load_file(titan_v02 / "oracle_forward.safetensors")
    assert oracle["tokens"].shape == (2, 32) and oracle["tokens"].dtype == torch.int64
    # tight: without the llama3 RoPE scaling 0.2.2 always applies (in config.json) the logits
    # differ by 7e-5; with it, by 1e-6
    torch.testing.assert_close(logits_of(model, oracle["tokens"]), oracle["logits"], rtol=1e-5, atol=1e-5)


def test_the_release_befores_names_map_the_same(titan, titan_case, tmp_path):
    """torchtitan before 0.3 saved ``layers.N.attention.wq`` (no ``qkv_linear``) and ``output``
    for the LM head: the same tensors under those names (written with DCP here, beside an
    optimizer entry) give the same model."""
    import torch.distributed.checkpoint as tdcp

    _, config, _ = titan_case
    oracle = load_file(titan / "oracle.safetensors")
    old = {k.replace("attention.qkv_linear.", "attention.").replace("lm_head.", "output."): v
           for k, v in oracle.items()}
    assert old.keys() != oracle.keys()
    state = {**old, "optimizer": {"state.tok_embeddings.weight.exp_avg": torch.zeros(3)}}
    tdcp.save(state, storage_writer=tdcp.FileSystemWriter(str(tmp_path / "step-3")), no_dist=True)
    ckpt = native.open_native(tmp_path / "step-3", model_config=config)
    assert ckpt.format == "torchtitan"
    model = native.build_model(ckpt, dtype=torch.float32, with_lm_head=True)
    forward = load_file(titan / "oracle_forward.safetensors")
    torch.testing.assert_close(logits_of(model, forward["tokens"]), forward["logits"], rtol=1e-4, atol=1e-4)


def test_layertrack_score_reads_it_and_scores_it_as_its_transformers_copy(titan_case, tokenizer, tmp_path):
    step, config, tok = titan_case
    ours = score(str(step), "--model-config", str(config), "--tokenizer", str(tok))
    assert ours["model_type"] == "llama" and ours["plan"]["mode"] == "resident"
    model = native.build_model(native.open_native(step, model_config=config), dtype=torch.float32,
                               with_lm_head=True)
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    same_scores(ours, score_here(hf))
    named = score(str(step), "--format", "torchtitan", "--model-config", str(config), "--tokenizer", str(tok))
    same_scores(named, ours, tol=0)


def test_what_a_user_gets_wrong_is_said(titan_case, tmp_path):
    step, config, tok = titan_case
    line = fails(str(step), "--tokenizer", str(tok))
    assert "(code architecture_missing)" in line and "torchtitan" in line and "--model-config" in line, line
    cfg = json.loads(config.read_text())
    (tmp_path / "gpt2.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(FormatUnsupported, match="llama and qwen3"):
        native.open_native(step, model_config=tmp_path / "gpt2.json")
    (tmp_path / "deeper.json").write_text(json.dumps(cfg | {"num_hidden_layers": cfg["num_hidden_layers"] + 1}))
    with pytest.raises(MappingIncomplete, match=f"layers.{cfg['num_hidden_layers']}"):
        native.build_model(native.open_native(step, model_config=tmp_path / "deeper.json"))
    with pytest.raises(ArchitectureMissing):
        native.open_native(step)
    # a directory that is not torchtitan's, named so
    other = tmp_path / "not-titan"
    shutil.copytree(step, other)
    (other / ".metadata").unlink()
    with pytest.raises(CheckpointIncomplete, match="has not finished"):
        native.open_native(other, format="torchtitan", model_config=config)
