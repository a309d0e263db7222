"""Probe corpus: the fixed text every checkpoint is scored on, and its tokenisation.

The built-in default probe (``probe_data/default.jsonl``) was written for this project:
prose, dialogue, code, maths and lists, one document per line. A probe is identified by the
sha256 of its file's bytes. Users may bring their own: a UTF-8 ``.txt`` file (one document)
or a ``.jsonl`` file (one document per line: ``{"text": "..."}`` or a bare JSON string).

Tokenisation is deterministic: the documents are put in an order drawn from a fixed seed
(so that a token budget samples every genre, not just the first documents), tokenised,
joined with the tokenizer's end-of-text token, and cut into sequences of ``seq_len`` tokens,
each starting with the tokenizer's BOS token when it has one. The last sequence is cut short
(and right-padded) so that exactly ``max_tokens`` tokens are scored.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ProbeError
from .vocabulary import DEFAULT_PROBE, DEFAULT_SEQ_LEN

DEFAULT_SEED = 0


@dataclass(frozen=True)
class Probe:
    name: str
    documents: tuple[str, ...]
    sha256: str

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents)


@dataclass
class ProbeTokens:
    """Token sequences ready for a forward pass (lists, so this module needs no torch)."""

    input_ids: list[list[int]]  # (n_seq, seq_len)
    attention_mask: list[list[int]]  # 1 for real tokens, 0 for right padding
    score_mask: list[list[int]]  # 1 for the tokens whose hidden states are scored
    n_tokens: int  # tokens scored: sum of score_mask
    n_available: int  # scorable tokens the probe holds at this seq_len
    seq_len: int
    probe_sha256: str
    tokenizer_fingerprint: str


@lru_cache(maxsize=1)
def default_probe() -> Probe:
    data = resources.files("layertrack.workers").joinpath("probe_data/default.jsonl").read_bytes()
    return _parse_jsonl(data, DEFAULT_PROBE, "the built-in default probe")


def load_probe(path: str | Path | None) -> Probe:
    """Load a probe from a UTF-8 .txt or .jsonl file; ``None`` gives the built-in default."""
    if path is None or str(path) == DEFAULT_PROBE:
        return default_probe()
    p = Path(path).expanduser()
    if not p.exists():
        raise ProbeError(f"probe file {str(p)!r} does not exist; give a UTF-8 .txt or .jsonl file")
    if not p.is_file():
        raise ProbeError(f"probe {str(p)!r} is not a file; give a UTF-8 .txt or .jsonl file")
    data = p.read_bytes()
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return _parse_jsonl(data, p.name, f"probe file {str(p)!r}")
    text = _decode(data, f"probe file {str(p)!r}")
    if not text.strip():
        raise ProbeError(f"probe file {str(p)!r} is empty; it needs text to run through the model")
    return Probe(name=p.name, documents=(text,), sha256=hashlib.sha256(data).hexdigest())


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ProbeError(
            f"{what} is not valid UTF-8 (byte {e.start}, line {line}: "
            f"{data[e.start:e.start + 4]!r}); save it as UTF-8"
        ) from None


def _parse_jsonl(data: bytes, name: str, what: str) -> Probe:
    text = _decode(data, what)
    docs: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProbeError(f"{what}, line {lineno}: not valid JSON ({e.msg})") from None
        if isinstance(rec, dict):
            if not isinstance(rec.get("text"), str):
                raise ProbeError(
                    f"{what}, line {lineno}: a JSON object needs a string field \"text\""
                )
            rec = rec["text"]
        if not isinstance(rec, str):
            raise ProbeError(
                f"{what}, line {lineno}: expected {{\"text\": \"...\"}} or a JSON string, "
                f"got {type(rec).__name__}"
            )
        if rec.strip():
            docs.append(rec)
    if not docs:
        raise ProbeError(f"{what} holds no documents; it needs one {{\"text\": ...}} per line")
    return Probe(name=name, documents=tuple(docs), sha256=hashlib.sha256(data).hexdigest())


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the tokenizer's class, vocabulary and special tokens."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def tokenize_probe(
    probe: Probe,
    tokenizer: Any,
    *,
    max_tokens: int | None,
    seq_len: int = DEFAULT_SEQ_LEN,
    drop_first_token: bool = False,
    seed: int = DEFAULT_SEED,
) -> ProbeTokens:
    """Cut the probe into fixed-length token sequences (see the module docstring)."""
    if seq_len < 2:
        raise ProbeError(f"seq_len must be at least 2, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise ProbeError(f"max_tokens must be positive, got {max_tokens}")
    order = list(range(len(probe.documents)))
    random.Random(seed).shuffle(order)
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for k, i in enumerate(order):
        if k and eos is not None:
            stream.append(eos)
        stream.extend(tokenizer(probe.documents[i], add_special_tokens=False)["input_ids"])
    body = seq_len - 1 if bos is not None else seq_len
    scored_per_seq = seq_len - 1 if drop_first_token else seq_len
    n_full = len(stream) // body
    n_available = n_full * scored_per_seq
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)

    input_ids: list[list[int]] = []
    attention: list[list[int]] = []
    score: list[list[int]] = []
    remaining = n_available if max_tokens is None else min(max_tokens, n_available)
    for s in range(n_full):
        if remaining <= 0:
            break
        ids = ([bos] if bos is not None else []) + stream[s * body : (s + 1) * body]
        scored = [1] * seq_len
        if drop_first_token:
            scored[0] = 0
        take = min(remaining, scored_per_seq)
        length = take + (1 if drop_first_token else 0)  # tokens fed for this sequence
        scored = scored[:length] + [0] * (seq_len - length)
        mask = [1] * length + [0] * (seq_len - length)
        ids = ids[:length] + [pad] * (seq_len - length)
        input_ids.append(ids)
        attention.append(mask)
        score.append(scored)
        remaining -= take
    n_tokens = sum(map(sum, score))
    if n_tokens == 0:
        raise ProbeError(
            f"probe {probe.name!r} gives no complete sequence of {seq_len} tokens "
            f"({len(stream)} tokens in all); use a longer probe or a smaller --seq-len"
        )
    return ProbeTokens(
        input_ids=input_ids,
        attention_mask=attention,
        score_mask=score,
        n_tokens=n_tokens,
        n_available=n_available,
        seq_len=seq_len,
        probe_sha256=probe.sha256,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
