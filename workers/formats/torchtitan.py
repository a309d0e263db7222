"""torchtitan's model names, mapped onto transformers' Llama and Qwen-3.

torchtitan's ``CheckpointManager`` saves a DCP directory (``step-N/``) whose model tensors
sit at the top level of the state dict, beside ``optimizer``, ``lr_scheduler``,
``dataloader`` and ``train_state``, in torchtitan's own names:

- the current release: ``tok_embeddings.weight``, ``layers.{i}.attention.qkv_linear.wq``
  (``wk``, ``wv``; a fused ``wqkv`` is saved split, by torchtitan's own save hook),
  ``layers.{i}.attention.wo``, ``layers.{i}.feed_forward.w1`` (gate), ``w3`` (up), ``w2``
  (down), ``layers.{i}.attention_norm``, ``layers.{i}.ffn_norm``, ``norm``, ``lm_head``;
  Qwen-3 adds ``layers.{i}.attention.q_norm`` and ``k_norm``;
- the release before it: ``layers.{i}.attention.wq`` (no ``qkv_linear``) and ``output``
  instead of ``lm_head``.

Both are read. A fused ``qkv_linear.wqkv`` (if a checkpoint holds one) is split per KV group
(``[n_kv, q_per_kv + 2, head_dim, dim]``: the group's query heads, its key, its value).

torchtitan's Llama applies RoPE to adjacent pairs of a head's dimensions (complex
multiplication), transformers' Llama to the two halves (``rotate_half``): the query and key
rows are permuted per head (as transformers' Llama conversion script permutes Meta's
weights, and torchtitan's own HF adapter does), so the same weights compute the same
attention. torchtitan's Qwen-3 uses the halves
(cos/sin RoPE) as transformers does: nothing is permuted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from . import mapping

#: top-level names of torchtitan's model state dict (what is not the model is not read)
MODEL_ROOTS = ("tok_embeddings", "layers", "norm", "lm_head", "output")
#: the model types mapped, and whether their query/key rows are permuted (complex RoPE)
MODEL_TYPES = {"llama": True, "qwen3": False}

_LAYER = re.compile(r"layers\.([0-9]+)\.(.+)")


def model_tensors(names: Iterable[str]) -> list[str]:
    """The names of ``names`` that belong to torchtitan's model (not its optimizer, scheduler,
    data loader or train state)."""
    return [n for n in names if n.split(".", 1)[0] in MODEL_ROOTS]


def looks_like(names: Iterable[str]) -> bool:
    """Whether a DCP state dict is torchtitan's: its model's token embedding at the top level."""
    return "tok_embeddings.weight" in set(names)


def _permute_rows(n_heads: int, head_dim: int):
    """torchtitan's query/key rows (pairs interleaved per head) in transformers' order (halves)."""

    def transform(parts: list[Any]) -> Any:
        w = parts[0]
        rest = w.shape[1:]
        return (w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)
                .contiguous())

    return transform


def _from_fused(which: str, n_heads: int, n_kv: int, head_dim: int, permute: bool):
    """One of q, k, v out of a fused ``wqkv`` laid out per KV group, rows permuted for RoPE."""
    per = n_heads // n_kv

    def transform(parts: list[Any]) -> Any:
        w = parts[0]
        rest = w.shape[1:]
        g = w.reshape(n_kv, per + 2, head_dim, *rest)
        part = {"q": g[:, :per], "k": g[:, per], "v": g[:, per + 1]}[which].reshape(-1, *rest)
        heads = {"q": n_heads, "k": n_kv, "v": n_kv}[which]
        if permute and which != "v":
            return _permute_rows(heads, head_dim)([part])
        return part.contiguous()

    return transform


def targets(names: Iterable[str], config: dict[str, Any]) -> tuple[list[mapping.Target], list[str]]:
    """(one target per parameter of the transformers model of ``config``, the checkpoint's
    model tensors left out on purpose: a tied head's second copy). Raises FormatUnsupported
    for a model type torchtitan's names are not mapped onto."""
    from ..errors import FormatUnsupported

    names = set(model_tensors(names))
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise FormatUnsupported(
            f"torchtitan checkpoints are mapped onto transformers' {' and '.join(MODEL_TYPES)} architectures; "
            f"--model-config names model_type {model_type!r}")
    permute = MODEL_TYPES[model_type]
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // n_heads)
    n_layers = int(config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))

    def first(*candidates: str) -> str:
        for c in candidates:
            if c in names:
                return c
        return candidates[0]  # absent: check() names it as missing

    out = [mapping.Target("model.embed_tokens.weight", ("tok_embeddings.weight",)),
           mapping.Target("model.norm.weight", ("norm.weight",))]
    ignored: list[str] = []
    head = first("lm_head.weight", "output.weight")
    if tied:
        out.append(mapping.Target("lm_head.weight", ("tok_embeddings.weight",)))
        ignored += [n for n in ("lm_head.weight", "output.weight") if n in names]
    else:
        out.append(mapping.Target("lm_head.weight", (head,)))
    for i in range(n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        fused = f"{src}attention.qkv_linear.wqkv.weight"
        for proj, heads in (("q", n_heads), ("k", n_kv), ("v", n_kv)):
            name = f"{dst}self_attn.{proj}_proj.weight"
            if fused in names:
                out.append(mapping.Target(name, (fused,), _from_fused(proj, n_heads, n_kv, head_dim, permute)))
                continue
            source = first(f"{src}attention.qkv_linear.w{proj}.weight", f"{src}attention.w{proj}.weight")
            transform = _permute_rows(heads, head_dim) if permute and proj != "v" else mapping.same
            out.append(mapping.Target(name, (source,), transform))
        renames = {
            "self_attn.o_proj.weight": "attention.wo.weight",
            "mlp.gate_proj.weight": "feed_forward.w1.weight",
            "mlp.up_proj.weight": "feed_forward.w3.weight",
            "mlp.down_proj.weight": "feed_forward.w2.weight",
            "input_layernorm.weight": "attention_norm.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight",
        }
        if model_type == "qwen3":
            renames["self_attn.q_norm.weight"] = "attention.q_norm.weight"
            renames["self_attn.k_norm.weight"] = "attention.k_norm.weight"
        out += [mapping.Target(dst + p, (src + s,)) for p, s in renames.items()]
    return out, ignored
