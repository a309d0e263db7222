"""nanoGPT's ``ckpt.pt`` (what its ``train.py`` saves: ``model``, ``optimizer``, ``model_args``,
``iter_num``, ``best_val_loss``, ``config``), read as a transformers GPT-2.

The architecture is nanoGPT's ``GPT`` with ``model_args`` (n_layer, n_head, n_embd,
block_size, bias, vocab_size, dropout), which is GPT-2 with exact GELU (``nn.GELU()``;
transformers' GPT-2 default is the tanh approximation) and LayerNorm epsilon 1e-5. The
mapping: names are GPT-2's once a compiled model's ``_orig_mod.`` prefix is dropped; the four
``nn.Linear`` weights (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) are
transposed into ``Conv1D``'s ``[in, out]``; with ``bias=False`` every bias is zeros; the LM
head is tied to the token embedding, as nanoGPT ties it. The optimizer state is never read.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArchitectureMissing
from . import mapping
from .torchsave import TorchSaveIndex

COMPILE_PREFIX = "_orig_mod."
#: nanoGPT's nn.Linear weights that transformers' GPT-2 keeps as Conv1D ([in, out])
LINEAR = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_nanogpt(index: TorchSaveIndex) -> bool:
    return isinstance(index.value("model_args"), dict) and bool(index.under("model."))


def model_tensors(index: TorchSaveIndex) -> dict[str, Any]:
    """The model's tensors keyed by nanoGPT's own names (the compile prefix dropped)."""
    return {name.removeprefix(COMPILE_PREFIX): t for name, t in index.under("model.").items()}


def architecture(index: TorchSaveIndex, shown: str) -> dict[str, Any]:
    """The transformers config (as config.json would hold it) of nanoGPT's ``model_args``."""
    args = index.value("model_args")
    keys = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    if not isinstance(args, dict) or any(not isinstance(args.get(k), int) for k in keys):
        raise ArchitectureMissing(
            f"{shown} has no usable model_args (it needs {', '.join(keys)} as integers, as nanoGPT's train.py "
            "saves them); give the architecture with --model-config"
        )
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "n_layer": args["n_layer"], "n_head": args["n_head"], "n_embd": args["n_embd"],
        "n_positions": args["block_size"], "vocab_size": args["vocab_size"], "n_inner": 4 * args["n_embd"],
        "activation_function": "gelu", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        # GPT-2's end-of-text token (50256) where the vocabulary has it; none in a smaller one
        # (transformers warns of an id outside the vocabulary otherwise)
        **({} if args["vocab_size"] > 50256 else {"bos_token_id": None, "eos_token_id": None}),
    }


def targets(index: TorchSaveIndex, config: dict[str, Any]) -> list[mapping.Target]:
    """One target per parameter of transformers' GPT2LMHeadModel, its sources named the
    nanoGPT way (:func:`model_tensors`)."""
    tensors = model_tensors(index)
    d = config["n_embd"]
    dtype = tensors["transformer.wte.weight"].dtype if "transformer.wte.weight" in tensors else "float32"

    def bias(name: str, width: int) -> mapping.Target:
        return (mapping.Target(name, (name,)) if name in tensors
                else mapping.Target(name, (), mapping.zeros((width,), dtype)))

    head = "transformer.wte.weight" if _tied(tensors) or "lm_head.weight" not in tensors else "lm_head.weight"
    out = [mapping.Target("transformer.wte.weight", ("transformer.wte.weight",)),
           mapping.Target("transformer.wpe.weight", ("transformer.wpe.weight",)),
           mapping.Target("transformer.ln_f.weight", ("transformer.ln_f.weight",)),
           bias("transformer.ln_f.bias", d),
           mapping.Target("lm_head.weight", (head,))]
    widths = {"ln_1": d, "ln_2": d, "attn.c_attn": 3 * d, "attn.c_proj": d, "mlp.c_fc": 4 * d, "mlp.c_proj": d}
    for i in range(config["n_layer"]):
        for part, width in widths.items():
            weight = f"transformer.h.{i}.{part}.weight"
            out.append(mapping.Target(weight, (weight,),
                                      mapping.transposed if f"{part}.weight" in LINEAR else mapping.same))
            out.append(bias(f"transformer.h.{i}.{part}.bias", width))
    return out


def _tied(tensors: dict[str, Any]) -> bool:
    """Whether the LM head is saved as the token embedding's own storage (nanoGPT ties them)."""
    head, wte = tensors.get("lm_head.weight"), tensors.get("transformer.wte.weight")
    return head is not None and wte is not None and (head.storage, head.start, head.shape) == (
        wte.storage, wte.start, wte.shape)


def ignored(index: TorchSaveIndex) -> list[str]:
    """What nanoGPT saves that is not read: the causal mask buffers ``attn.bias`` (without flash
    attention), and the tied LM head (the embedding's bytes again, read once as the embedding)."""
    tensors = model_tensors(index)
    return [n for n, t in tensors.items() if n.endswith(".attn.bias") and len(t.shape) == 4] + (
        ["lm_head.weight"] if _tied(tensors) else [])


def source_name(name: str, index: TorchSaveIndex) -> str:
    """The path in the file of a tensor named the nanoGPT way."""
    full = f"model.{name}"
    return full if full in index.tensors else f"model.{COMPILE_PREFIX}{name}"
