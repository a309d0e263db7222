"""Every bad checkpoint input gives its own error class and a message that says what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from layertrack.workers import errors
from layertrack.workers.checkpoint import resolve_checkpoint_path
from layertrack.workers.scoring import ScoreConfig, score_checkpoint
from tiny_models import build_checkpoint
from transformers import BertConfig, BertForMaskedLM

SMALL = ScoreConfig(max_tokens=600, seq_len=64)


def score(uri, **kw):
    return score_checkpoint(str(uri), config=kw.pop("config", SMALL), **kw)


def test_missing_path(tmp_path):
    with pytest.raises(errors.CheckpointNotFound, match=r"checkpoint path '.*/nope' does not exist"):
        score(tmp_path / "nope")


def test_a_file_is_not_a_model_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(errors.NotAModelDirectory, match="is a file, not a model directory"):
        score(f)


def test_directory_without_config(tmp_path):
    with pytest.raises(errors.NotAModelDirectory, match=r"it has no config\.json"):
        score(tmp_path)


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(errors.NotAModelDirectory, match="is not a valid config"):
        score(tmp_path)


def test_config_without_weights(tmp_path, checkpoints):
    (tmp_path / "config.json").write_bytes((checkpoints("llama") / "config.json").read_bytes())
    with pytest.raises(errors.NoSafetensorsWeights, match=r"has config\.json but no weights"):
        score(tmp_path)


def test_pickle_weights_refused_unless_allowed(tmp_path, tokenizer):
    path = build_checkpoint(tmp_path / "p", "gpt2", tokenizer, safe=False)
    with pytest.raises(errors.NoSafetensorsWeights, match=r"only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        score(path)
    assert score(path, config=ScoreConfig(max_tokens=600, seq_len=64, allow_pickle=True)).n_layers == 3


def test_missing_shard(tmp_path, tokenizer):
    path = build_checkpoint(tmp_path / "s", "llama", tokenizer, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    with pytest.raises(errors.NoSafetensorsWeights, match=f"incomplete: shard\\(s\\) {victim} listed"):
        score(path)


def test_not_a_causal_lm(tmp_path, tokenizer):
    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=384))
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(errors.NotACausalLM, match=r"not a causal language model \(BertForMaskedLM\)"):
        score(tmp_path / "bert")


def test_tokenizer_missing_and_given_separately(tmp_path, tokenizer, checkpoints):
    path = build_checkpoint(tmp_path / "notok", "qwen2", None)
    with pytest.raises(errors.TokenizerMissing, match=r"no tokenizer files in .*pass --tokenizer"):
        score(path)
    result = score(path, tokenizer_path=checkpoints("qwen2"))
    assert result.scores.n_tokens == 600


def test_unsupported_uri_schemes(tmp_path):
    with pytest.raises(errors.InvalidCheckpointURI, match="unsupported URI scheme 's3'"):
        score("s3://bucket/ckpt")
    with pytest.raises(errors.InvalidCheckpointURI, match=r"names host 'example\.com'"):
        score("file://example.com/tmp/x")
    with pytest.raises(errors.InvalidCheckpointURI, match="empty"):
        score("  ")


def test_roots_refuse_traversal_and_symlinks_out(tmp_path, checkpoints):
    root = tmp_path / "root"
    root.mkdir()
    outside = checkpoints("llama")
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(errors.CheckpointOutsideRoots, match="outside the allowed checkpoint roots"):
        resolve_checkpoint_path(str(root / "link"), [root])
    with pytest.raises(errors.CheckpointOutsideRoots):
        resolve_checkpoint_path(str(root / ".." / "elsewhere"), [root])
    with pytest.raises(errors.CheckpointOutsideRoots):
        resolve_checkpoint_path(outside.as_uri(), [root])
    inside = root / "run" / "step-1"
    inside.mkdir(parents=True)
    assert resolve_checkpoint_path(f"file://{inside}", [root]) == inside.resolve()
    assert resolve_checkpoint_path(str(outside), [outside.parent]) == outside.resolve()


def test_outside_roots_error_says_how_to_allow_a_root(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    with pytest.raises(errors.CheckpointOutsideRoots) as caught:
        resolve_checkpoint_path(str(elsewhere), [root])
    message = caught.value.message
    assert str(root) in message
    assert "LAYERTRACK_CHECKPOINT_ROOTS" in message
    assert "layertrack up --roots DIR" in message


def test_out_of_memory_is_a_clear_error(tmp_path, tokenizer):
    """Load a ~200 MB model under an address-space limit too small for it."""
    path = build_checkpoint(tmp_path / "big", "llama", tokenizer, hidden=1024, layers=4)
    code = textwrap.dedent(
        f"""
        import resource, torch, transformers
        from layertrack.workers import errors
        from layertrack.workers.scoring import ScoreConfig, score_checkpoint
        import layertrack.workers.checkpoint, transformers.models.llama.modeling_llama
        vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 120 * 2**20, resource.RLIM_INFINITY))
        try:
            score_checkpoint({str(path)!r}, config=ScoreConfig(max_tokens=8192, seq_len=512))
        except errors.OutOfMemory as e:
            print("OOM:", e)
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "OOM: out of memory while" in out.stdout, out.stdout + out.stderr
    assert "--dtype" in out.stdout or "batch-size" in out.stdout
