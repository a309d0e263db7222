"""litgpt's checkpoints (workers/formats/litgpt.py): the ``step-00000003/`` directory ``litgpt pretrain``
(litgpt 0.5.13, its own CLI and training loop) wrote after three steps of a tiny Llama with
grouped-query attention on CPU (tests/writers/litgpt_llama.py, the ``litgpt_ckpt`` fixture), read
without conversion. The oracle is litgpt's own forward: the transformers Llama built from the
checkpoint gives its logits; so do a GPT-NeoX (Pythia-style) and a multi-query Llama-3 with a tied
head that litgpt's GPT wrote untrained. Then the bytes read (the model's, not AdamW's), scoring
through ``layertrack score``, a checkpoint still being written, and what a user gets wrong."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from layertrack.workers.errors import (
    ArchitectureMissing,
    CheckpointIncomplete,
    FormatUnsupported,
    MalformedWeights,
    MappingIncomplete,
)
from layertrack.workers.formats import litgpt, native, torchsave
from safetensors.torch import load_file
from test_native_scoring import fails, same_scores, score, score_here

STEP = "step-00000003"


@pytest.fixture(scope="module")
def lit_case(litgpt_ckpt, tokenizer, tmp_path_factory):
    """(litgpt's step directory, the tokenizer's directory)."""
    tok = tmp_path_factory.mktemp("litgpt-case") / "tokenizer"
    tokenizer.save_pretrained(tok)
    return litgpt_ckpt / STEP, tok


def logits_of(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def test_what_pretrain_saved(litgpt_ckpt):
    """The files and keys litgpt's pretrain writes at a step (what the reader relies on)."""
    step = litgpt_ckpt / STEP
    assert {p.name for p in step.iterdir()} == {"lit_model.pth", "model_config.yaml", "hyperparameters.yaml"}
    assert {p.name for p in litgpt_ckpt.glob("step-*")} == {f"step-{i:08d}" for i in (1, 2, 3)}
    index = torchsave.read_index(*torchsave.local_reader(step / "lit_model.pth"), "lit_model.pth")
    assert set(index.tree) == {"model", "optimizer", "train_dataloader", "iter_num", "step_count"}
    assert index.value("step_count") == 3 and set(index.tree["optimizer"]) == {"state", "param_groups"}
    assert set(litgpt.model_tensors(index)) == {
        "lm_head.weight", "transformer.wte.weight", "transformer.ln_f.weight",
        *(f"transformer.h.{i}.{n}.weight" for i in (0, 1) for n in (
            "norm_1", "attn.qkv", "attn.proj", "norm_2", "mlp.fc_1", "mlp.fc_2", "mlp.proj"))}
    config = litgpt.read_config(step / "model_config.yaml")
    assert (config["n_head"], config["n_query_groups"], config["vocab_size"], config["padded_vocab_size"]) == (
        4, 2, 384, 512)


def test_the_checkpoint_gives_litgpts_own_logits(litgpt_ckpt):
    """The fused qkv split as litgpt 0.5.13 lays it out (every query head, then the keys, then the
    values), nothing permuted for RoPE. Read as laid out per query group instead (litgpt's legacy
    ``attn.attn`` layout), the logits move by more than 1."""
    step = litgpt_ckpt / STEP
    assert native.detect(step) == "litgpt"
    ckpt = native.open_native(step)
    assert ckpt.format == "litgpt" and ckpt.model_type == "llama"
    arch = ckpt.architecture
    assert (arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"], arch["vocab_size"]) == (
        4, 2, 32, 512)
    assert arch["tie_word_embeddings"] is False and arch["rope_parameters"]["rope_theta"] == 500000.0
    model = native.build_model(ckpt, dtype=torch.float32, with_lm_head=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    oracle = load_file(litgpt_ckpt / "oracle_forward.safetensors")
    torch.testing.assert_close(logits_of(model, oracle["tokens"]), oracle["logits"], rtol=1e-4, atol=1e-4)

    wrong = dataclasses.replace(ckpt, targets=[
        dataclasses.replace(t, transform=litgpt._fused(t.name.split(".")[-2][0], 4, 2, 32, legacy=True))
        if t.sources and t.sources[0].endswith("attn.qkv.weight") else t for t in ckpt.targets])
    off = (logits_of(native.build_model(wrong, dtype=torch.float32, with_lm_head=True), oracle["tokens"])
           - oracle["logits"]).abs().max()
    assert off > 1.0, off


@pytest.mark.parametrize("variant, architecture", [("pythia", "GPTNeoXForCausalLM"), ("llama3", "LlamaForCausalLM")])
def test_the_variants_give_litgpts_own_logits(litgpt_ckpt, variant, architecture):
    """pythia: parallel residual, LayerNorm, biases, a quarter of each head rotated, positions condensed
    by 2 (linear RoPE scaling), the fused qkv regrouped per head for GPT-NeoX, the state dict at the top
    level of the file. llama3: one key/value head, head_size 48 (not n_embd / n_head), biases on the qkv
    alone (o_proj's bias zeros), Llama-3 RoPE scaling, the head tied to the embedding (read once)."""
    directory = litgpt_ckpt / variant
    ckpt = native.open_native(directory)
    model = native.build_model(ckpt, dtype=torch.float32, with_lm_head=True)
    assert type(model).__name__ == architecture
    oracle = load_file(litgpt_ckpt / f"{variant}.forward.safetensors")
    torch.testing.assert_close(logits_of(model, oracle["tokens"]), oracle["logits"], rtol=1e-4, atol=1e-4)
    if variant == "llama3":
        assert ckpt.architecture["tie_word_embeddings"] is True and ckpt.ignored == ["lm_head.weight"]
        assert ckpt.architecture["rope_parameters"]["rope_type"] == "llama3"
        # the embedding's storage, counted once, on the name read
        assert ckpt.tensor_bytes["lm_head.weight"] == 0 and ckpt.tensor_bytes["transformer.wte.weight"] > 0
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert ckpt.architecture["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0,
                                                        "partial_rotary_factor": 0.25}


def test_only_the_models_tensors_are_read(lit_case, monkeypatch):
    """AdamW's two moments beside the model in lit_model.pth are never read."""
    step, _ = lit_case
    file = step / "lit_model.pth"
    read: list[int] = []
    real = torchsave.local_reader

    def counting(path):
        read_at, size = real(path)

        def at(offset, length):
            read.append(length)
            return read_at(offset, length)

        return at, size

    monkeypatch.setattr(torchsave, "local_reader", counting)
    ckpt = native.open_native(step)
    read.clear()  # the zip directory and data.pkl: the index
    state = ckpt.state_dict()
    model_bytes = ckpt.model_bytes
    assert model_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert sum(read) <= 1.1 * model_bytes
    assert file.stat().st_size > 2.5 * model_bytes  # AdamW's exp_avg and exp_avg_sq
    # every tensor as saved: renamed, or the fused qkv cut in three
    saved = torch.load(file, weights_only=True)["model"]
    renames = {"model.embed_tokens.weight": "transformer.wte.weight", "model.norm.weight": "transformer.ln_f.weight",
               "lm_head.weight": "lm_head.weight"}
    parts = {"self_attn.o_proj": "attn.proj", "input_layernorm": "norm_1", "post_attention_layernorm": "norm_2",
             "mlp.gate_proj": "mlp.fc_1", "mlp.up_proj": "mlp.fc_2", "mlp.down_proj": "mlp.proj"}
    for i in (0, 1):
        renames |= {f"model.layers.{i}.{p}.weight": f"transformer.h.{i}.{s}.weight" for p, s in parts.items()}
        qkv = [state[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"]
        assert [t.shape[0] for t in qkv] == [128, 64, 64]
        assert torch.equal(torch.cat(qkv), saved[f"transformer.h.{i}.attn.qkv.weight"])
    assert len(renames) + 6 == len(state)
    for name, source in renames.items():
        assert torch.equal(state[name], saved[source]), name


def test_layertrack_score_reads_it_and_scores_it_as_its_transformers_copy(lit_case, tokenizer, tmp_path):
    step, tok = lit_case
    ours = score(str(step), "--tokenizer", str(tok))
    assert ours["model_type"] == "llama" and ours["plan"]["mode"] == "resident"
    ckpt = native.open_native(step)
    assert ours["plan"]["weight_bytes"] == ckpt.model_bytes
    model = native.build_model(ckpt, dtype=torch.float32, with_lm_head=True)
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    same_scores(ours, score_here(hf))
    named = score(str(step), "--format", "litgpt", "--tokenizer", str(tok))
    same_scores(named, ours, tol=0)
    # --model-config (a transformers config) replaces model_config.yaml's architecture
    given = score(str(step), "--model-config", str(hf / "config.json"), "--tokenizer", str(tok))
    same_scores(given, ours)


def test_a_checkpoint_still_being_written_is_incomplete(lit_case, tmp_path):
    """litgpt writes lit_model.pth (a zip whose directory comes last), then model_config.yaml."""
    step, tok = lit_case
    copy = tmp_path / "step"
    shutil.copytree(step, copy)
    files = native.complete_files(copy, "litgpt")
    assert [f[0] for f in files] == ["lit_model.pth", "model_config.yaml"]
    (copy / "model_config.yaml").unlink()
    with pytest.raises(CheckpointIncomplete, match=r"no model_config\.yaml yet"):
        native.complete_files(copy, "litgpt")
    data = (step / "lit_model.pth").read_bytes()
    (copy / "lit_model.pth").write_bytes(data[: len(data) - 200])
    shutil.copy(step / "model_config.yaml", copy)
    assert native.detect(copy) == "litgpt"
    with pytest.raises(CheckpointIncomplete, match=r"not a whole torch\.save archive yet"):
        native.complete_files(copy, "litgpt")
    with pytest.raises(MalformedWeights, match="truncated"):
        native.open_native(copy)
    line = fails(str(copy), "--tokenizer", str(tok))
    assert "(code malformed_weights)" in line and "truncated" in line, line


def test_the_identity_holds_model_config_yaml(lit_case, tmp_path):
    step, _ = lit_case
    copy = tmp_path / "step"
    shutil.copytree(step, copy)
    first = native.open_native(copy).fingerprint()
    assert native.identity(copy, "litgpt") == first
    assert native.open_native(copy).fingerprint() == first
    yaml_file = copy / "model_config.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("rope_base: 500000", "rope_base: 500001"))
    assert native.open_native(copy).fingerprint() != first


def test_what_a_user_gets_wrong_is_said(lit_case, tmp_path):
    step, tok = lit_case
    # the HF config.json litgpt copies beside its files (copy_config_files) does not make it an HF checkpoint
    copy = tmp_path / "with-config-json"
    shutil.copytree(step, copy)
    (copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert native.detect(copy) == "litgpt"
    assert score(str(copy), "--tokenizer", str(tok))["model_type"] == "llama"
    # no model_config.yaml: the architecture is asked for
    (copy / "model_config.yaml").unlink()
    with pytest.raises(ArchitectureMissing, match=r"model_config\.yaml.*--model-config"):
        native.open_native(copy)
    # a Config transformers' Llama does not compute the same way
    other = tmp_path / "qk-norm"
    shutil.copytree(step, other)
    text = (step / "model_config.yaml").read_text()
    (other / "model_config.yaml").write_text(text.replace("norm_qk: false", "norm_qk: true"))
    with pytest.raises(FormatUnsupported, match="norm_qk: true"):
        native.open_native(other)
    line = fails(str(other), "--tokenizer", str(tok))
    assert "(code format_unsupported)" in line and "norm_qk" in line, line
    # an architecture that does not fit the tensors
    (other / "model_config.yaml").write_text(text.replace("n_layer: 2", "n_layer: 3"))
    with pytest.raises(MappingIncomplete, match=r"lacks: transformer\.h\.2\.attn"):
        native.build_model(native.open_native(other))
    (tmp_path / "gpt2.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(FormatUnsupported, match="llama and gpt_neox"):
        native.open_native(step, model_config=tmp_path / "gpt2.json")
    # a nanoGPT directory is still nanoGPT's
    nano = tmp_path / "nano"
    nano.mkdir()
    torch.save({"model": {"transformer.wte.weight": torch.zeros(4, 2)}, "model_args": {}}, nano / "ckpt.pt")
    assert native.detect(nano) == "nanogpt"


def test_the_legacy_per_group_layout_reads_the_same(litgpt_ckpt, tmp_path):
    """``attn.attn`` laid out per query group (what litgpt's load hook still accepts and regroups):
    the same weights saved that way give the same logits."""
    step = litgpt_ckpt / STEP
    saved = torch.load(step / "lit_model.pth", weights_only=True)
    n_kv, per, hs = 2, 2, 32
    model = {}
    for name, t in saved["model"].items():
        if name.endswith("attn.qkv.weight"):
            q, k, v = t.split((n_kv * per * hs, n_kv * hs, n_kv * hs))
            groups = [torch.cat((q.reshape(n_kv, per * hs, -1)[g], k.reshape(n_kv, hs, -1)[g],
                                 v.reshape(n_kv, hs, -1)[g])) for g in range(n_kv)]
            model[name.replace("attn.qkv.", "attn.attn.")] = torch.cat(groups)
        else:
            model[name] = t
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"model": model}, legacy / "lit_model.pth")
    shutil.copy(step / "model_config.yaml", legacy)
    built = native.build_model(native.open_native(legacy), dtype=torch.float32, with_lm_head=True)
    oracle = load_file(litgpt_ckpt / "oracle_forward.safetensors")
    torch.testing.assert_close(logits_of(built, oracle["tokens"]), oracle["logits"], rtol=1e-4, atol=1e-4)
