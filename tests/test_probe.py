"""The built-in probe, user probes, and deterministic chunking."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import pytest
from layertrack.workers.errors import ProbeError
from layertrack.workers.probe import default_probe, load_probe, tokenize_probe


def test_default_probe_is_identified_by_its_file_hash_and_is_varied():
    probe = default_probe()
    data = resources.files("layertrack.workers").joinpath("probe_data/default.jsonl").read_bytes()
    assert probe.sha256 == hashlib.sha256(data).hexdigest()
    genres = {json.loads(line)["genre"] for line in data.decode().splitlines()}
    assert {"prose", "dialogue", "code", "maths", "list"} <= genres
    # about 4 characters per token for common BPE tokenizers: ≥ 64k tokens needs ≥ 256k chars
    assert probe.n_chars >= 256_000
    assert load_probe(None) == probe == load_probe("default")


def test_chunking_is_deterministic_exact_and_seeded(tokenizer):
    probe = default_probe()
    a = tokenize_probe(probe, tokenizer, max_tokens=1000, seq_len=64)
    b = tokenize_probe(probe, tokenizer, max_tokens=1000, seq_len=64)
    assert a.input_ids == b.input_ids
    assert a.n_tokens == 1000 and len(a.input_ids) == 16  # 15 full sequences + 40 tokens
    assert all(len(s) == 64 for s in a.input_ids)
    assert all(s[0] == tokenizer.bos_token_id for s in a.input_ids)
    assert a.attention_mask[-1] == [1] * 40 + [0] * 24 == a.score_mask[-1]
    assert a.input_ids[-1][40:] == [tokenizer.pad_token_id] * 24
    other_seed = tokenize_probe(probe, tokenizer, max_tokens=1000, seq_len=64, seed=1)
    assert other_seed.input_ids != a.input_ids
    assert a.probe_sha256 == probe.sha256 and len(a.tokenizer_fingerprint) == 64


def test_drop_first_token_masks_position_zero(tokenizer):
    t = tokenize_probe(default_probe(), tokenizer, max_tokens=630, seq_len=64, drop_first_token=True)
    assert t.n_tokens == 630 and len(t.input_ids) == 10
    assert all(m[0] == 0 and sum(m) == 63 for m in t.score_mask)
    assert all(m == [1] * 64 for m in t.attention_mask)


def test_user_probes_txt_and_jsonl(tmp_path, tokenizer):
    txt = tmp_path / "p.txt"
    txt.write_text("Hello world, this is a probe. " * 200, encoding="utf-8")
    p = load_probe(txt)
    assert p.name == "p.txt" and len(p.documents) == 1
    assert p.sha256 == hashlib.sha256(txt.read_bytes()).hexdigest()
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"text": "first document"}\n\n"second document"\n{"text": "third", "id": 3}\n')
    q = load_probe(jl)
    assert q.documents == ("first document", "second document", "third")
    t = tokenize_probe(p, tokenizer, max_tokens=None, seq_len=32)
    assert t.n_tokens == t.n_available == len(t.input_ids) * 32


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.txt", b"caf\xe9 au lait\n", r"is not valid UTF-8 \(byte 3, line 1"),
        ("empty.txt", b"  \n\n", "is empty"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"line 2: not valid JSON"),
        ("notext.jsonl", b'{"body": "x"}\n', r"line 1: a JSON object needs a string field \"text\""),
        ("number.jsonl", b"42\n", r"line 1: expected .* or a JSON string, got int"),
        ("blank.jsonl", b"\n\n", "holds no documents"),
    ],
)
def test_bad_probe_files(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(ProbeError, match=message):
        load_probe(f)


def test_missing_probe_and_directory(tmp_path):
    with pytest.raises(ProbeError, match="does not exist"):
        load_probe(tmp_path / "none.txt")
    with pytest.raises(ProbeError, match="is not a file"):
        load_probe(tmp_path)


def test_bad_chunking_options_and_a_probe_too_short(tmp_path, tokenizer):
    probe = default_probe()
    with pytest.raises(ProbeError, match="seq_len must be at least 2"):
        tokenize_probe(probe, tokenizer, max_tokens=10, seq_len=1)
    with pytest.raises(ProbeError, match="max_tokens must be positive"):
        tokenize_probe(probe, tokenizer, max_tokens=0)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(ProbeError, match="gives no complete sequence of 512 tokens"):
        tokenize_probe(load_probe(short), tokenizer, max_tokens=100, seq_len=512)
