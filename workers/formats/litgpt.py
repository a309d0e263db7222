"""litgpt's checkpoints (``lit_model.pth`` beside ``model_config.yaml``), read as transformers'
Llama or GPT-NeoX.

``litgpt pretrain`` saves ``out_dir/step-XXXXXXXX/`` (``finetune_full``: ``step-XXXXXX/``,
and ``final/``): ``lit_model.pth``, a ``torch.save`` of Fabric's state with the model's state
dict under ``model`` beside ``optimizer``, ``train_dataloader`` (pretrain) or ``scheduler``
(finetune), ``iter_num`` and ``step_count``, then ``hyperparameters.yaml`` and, last,
``model_config.yaml`` (``save_config``: litgpt's ``Config`` as YAML). A final finetune save
holds ``model`` alone; ``litgpt convert_to_litgpt`` writes the state dict at the top level.
All three are read; the optimizer's tensors are never read.

The architecture comes from ``model_config.yaml`` (``--model-config`` replaces it):

- Llama (``LLaMAMLP``, ``RMSNorm``, sequential residual, full RoPE): transformers' Llama with
  ``num_key_value_heads`` ``n_query_groups``, ``head_dim`` ``head_size``, ``vocab_size``
  ``padded_vocab_size`` (the embedding's rows), RoPE base ``rope_base`` (litgpt's Llama-3
  ``rope_adjustments`` as transformers' ``llama3`` RoPE, ``rope_condense_ratio`` as ``linear``),
  biases as ``bias`` and ``attn_bias`` say;
- GPT-NeoX (``GptNeoxMLP``, ``LayerNorm``, parallel or sequential residual, partial RoPE):
  transformers' GPT-NeoX, ``rotary_percentage`` as ``partial_rotary_factor``.

What either does not compute the same way (query/key norms, post-norms, sliding windows,
soft-capping, mixtures of experts, latent attention, scaled embeddings, Gemma's and OLMo's
norms, YaRN) is refused (``format_unsupported``), not approximated.

The names: ``transformer.wte``, ``transformer.h.{i}.norm_1``, ``attn.qkv`` (fused),
``attn.proj``, ``norm_2``, ``mlp.fc_1`` (gate), ``mlp.fc_2`` (up), ``mlp.proj`` (down) or
``mlp.fc`` and ``mlp.proj`` (GPT-NeoX), ``transformer.ln_f``, ``lm_head``. The fused
``attn.qkv`` holds every query head, then every key head, then every value head
(``(n_head + 2 * n_query_groups) * head_size`` rows, which litgpt 0.5.13's
``CausalSelfAttention`` splits with ``qkv.split``); for Llama it is split into
``q_proj``/``k_proj``/``v_proj``, for GPT-NeoX regrouped per head (``[q, k, v]`` of head 0, of
head 1, ...) as GPT-NeoX's ``query_key_value`` reads it. The legacy name ``attn.attn`` (laid out
per query group: its query heads, its key, its value), which litgpt's own load hook still
accepts, is read too, regrouped as that hook regroups it. litgpt's ``apply_rope`` rotates the
two halves of a head (``rotate_half``), as transformers does: no row is permuted. A head tied
to the embedding (``train.tie_embeddings``: one storage under both names) is read once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ArchitectureMissing, FormatUnsupported
from . import mapping
from .torchsave import StoredTensor, TorchSaveIndex

LIT_MODEL = "lit_model.pth"
MODEL_CONFIG = "model_config.yaml"
#: the most bytes of model_config.yaml read (litgpt writes about 1.5 KiB)
MAX_CONFIG_BYTES = 2**20
COMPILE_PREFIX = "_orig_mod."
#: the transformers model types litgpt's names are mapped onto
MODEL_TYPES = ("llama", "gpt_neox")


def read_config(file: Path) -> dict[str, Any]:
    """litgpt's ``Config`` fields from ``model_config.yaml`` (``yaml.safe_load``: plain values only)."""
    import yaml

    from ..checkpoint import read_small_file

    shown = repr(str(file))
    if not file.is_file():
        raise ArchitectureMissing(
            f"{str(file.parent)!r} has no {MODEL_CONFIG}, which litgpt writes beside {LIT_MODEL} (its Config); "
            "give the architecture with --model-config FILE|DIR (a transformers config.json)")
    try:
        config = yaml.safe_load(read_small_file(file, MAX_CONFIG_BYTES))
    except yaml.YAMLError as e:
        raise ArchitectureMissing(f"{shown} is not YAML litgpt wrote ({str(e).splitlines()[0]}); give the "
                                  "architecture with --model-config") from None
    if not isinstance(config, dict):
        raise ArchitectureMissing(f"{shown} holds no litgpt Config (a mapping of its fields); give the architecture "
                                  "with --model-config")
    return config


def prefix(index: TorchSaveIndex) -> str:
    """Where the model's state dict is in the file: under ``model`` (Fabric's state, as pretrain
    and finetune save it) or at the top level (``convert_to_litgpt``)."""
    return "model." if isinstance(index.value("model"), dict) else ""


def model_tensors(index: TorchSaveIndex) -> dict[str, StoredTensor]:
    """The model's tensors by litgpt's names (a compiled model's ``_orig_mod.`` dropped)."""
    return {n.removeprefix(COMPILE_PREFIX): t for n, t in index.under(prefix(index)).items()}


def source_name(name: str, index: TorchSaveIndex) -> str:
    """The path in the file of a tensor named the litgpt way."""
    full = prefix(index) + name
    return full if full in index.tensors else prefix(index) + COMPILE_PREFIX + name


def tied(tensors: dict[str, StoredTensor]) -> bool:
    """Whether the LM head is saved as the token embedding's own storage (``train.tie_embeddings``)."""
    head, wte = tensors.get("lm_head.weight"), tensors.get("transformer.wte.weight")
    return head is not None and wte is not None and (head.storage, head.start, head.shape) == (
        wte.storage, wte.start, wte.shape)


def _refused(config: dict[str, Any]) -> list[str]:
    """The Config's features that neither transformers architecture computes as litgpt does."""
    out = []
    flags = ("norm_qk", "post_attention_norm", "post_mlp_norm", "scale_embeddings", "lm_head_bias", "rope_interleave",
             "shared_attention_norm")
    out += [f"{k}: true" for k in flags if config.get(k)]
    out += [f"{k}: false" for k in ("norm_1", "norm_2") if config.get(k, True) is False]
    unset = ("attention_logit_softcapping", "final_logit_softcapping", "sliding_window_size", "latent_attention",
             "rope_local_base_freq", "first_k_dense_replace")
    out += [f"{k}: {config[k]!r}" for k in unset if config.get(k) is not None]
    scalar = config.get("attention_scores_scalar")
    if scalar is not None and scalar != config.get("head_size"):
        out.append(f"attention_scores_scalar: {scalar!r}")
    if config.get("n_expert"):
        out.append(f"n_expert: {config['n_expert']!r}")
    name = str(config.get("name") or "")
    if "Gemma" in name and config.get("norm_class_name") == "RMSNorm":
        out.append(f"name {name!r} (Gemma's RMSNorm adds 1 to its weight)")
    if "OLMo" in name and config.get("norm_class_name") == "LayerNorm":
        out.append(f"name {name!r} (OLMo's LayerNorm has no weight)")
    return out


def _rope(config: dict[str, Any], shown: str) -> dict[str, Any]:
    """transformers' ``rope_parameters`` for the Config's RoPE."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.get("rope_base", 10000))}
    adjust = config.get("rope_adjustments")
    condense = config.get("rope_condense_ratio", 1) or 1
    if adjust is not None and condense != 1:
        raise FormatUnsupported(f"{shown}: rope_adjustments with rope_condense_ratio {condense} has no transformers "
                                "RoPE that computes it")
    if condense != 1:
        rope.update(rope_type="linear", factor=float(condense))
    elif adjust is not None:
        llama3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")
        if not isinstance(adjust, dict) or any(k in adjust for k in ("beta_fast", "beta_slow")):
            raise FormatUnsupported(f"{shown}: rope_adjustments {adjust!r} (YaRN) is not mapped onto transformers' "
                                    "RoPE yet")
        if all(k in adjust for k in llama3):
            rope.update(rope_type="llama3", factor=float(adjust["factor"]),
                        low_freq_factor=float(adjust["low_freq_factor"]),
                        high_freq_factor=float(adjust["high_freq_factor"]),
                        original_max_position_embeddings=int(adjust["original_max_seq_len"]))
        elif "factor" in adjust:
            rope.update(rope_type="linear", factor=float(adjust["factor"]))
    return rope


def architecture(config: dict[str, Any], tensors: dict[str, StoredTensor], shown: str) -> dict[str, Any]:
    """The transformers config (as config.json would hold it) of litgpt's ``config`` (the fields of
    ``model_config.yaml``); ``tensors`` say whether the head is tied. FormatUnsupported for a
    Config neither Llama nor GPT-NeoX computes the same way."""
    keys = ("n_layer", "n_embd", "n_head", "padded_vocab_size", "block_size", "intermediate_size")
    if any(not isinstance(config.get(k), int) for k in keys):
        raise ArchitectureMissing(f"{shown} lacks litgpt Config fields ({', '.join(keys)} as integers, as litgpt's "
                                  "save_config writes them); give the architecture with --model-config")
    refused = _refused(config)
    mlp, norm = config.get("mlp_class_name", "GptNeoxMLP"), config.get("norm_class_name", "LayerNorm")
    n_head, d = config["n_head"], config["n_embd"]
    head_size = config.get("head_size") or d // n_head
    n_groups = config.get("n_query_groups") or n_head
    rotary = float(config.get("rotary_percentage", 0.25))
    parallel = bool(config.get("parallel_residual", True))
    bias, attn_bias = bool(config.get("bias", True)), bool(config.get("attn_bias", False))
    if mlp == "LLaMAMLP" and norm == "RMSNorm":
        if parallel:
            refused.append("parallel_residual: true with LLaMAMLP")
        if rotary != 1.0:
            refused.append(f"rotary_percentage: {rotary} with LLaMAMLP")
        model_type = "llama"
    elif mlp == "GptNeoxMLP" and norm == "LayerNorm":
        if n_groups != n_head:
            refused.append(f"n_query_groups: {n_groups} < n_head with GptNeoxMLP")
        if head_size * n_head != d:
            refused.append(f"head_size: {head_size} with n_embd {d} and n_head {n_head}")
        model_type = "gpt_neox"
    else:
        refused.append(f"mlp_class_name: {mlp} with norm_class_name: {norm}")
        model_type = None
    if refused:
        raise FormatUnsupported(
            f"{shown} describes a litgpt model layertrack does not map onto transformers yet ({'; '.join(refused)}); "
            "it maps litgpt's Llama (LLaMAMLP, RMSNorm) and GPT-NeoX (GptNeoxMLP, LayerNorm) configs. Convert the "
            "checkpoint with litgpt's convert_from_litgpt and save it with save_pretrained to score it")
    rope = _rope(config, shown)
    common = {
        "num_hidden_layers": config["n_layer"], "hidden_size": d, "num_attention_heads": n_head,
        "intermediate_size": config["intermediate_size"], "vocab_size": config["padded_vocab_size"],
        "max_position_embeddings": config["block_size"], "tie_word_embeddings": tied(tensors),
    }
    if model_type == "llama":
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **common,
                "num_key_value_heads": n_groups, "head_dim": head_size, "hidden_act": "silu",
                "rms_norm_eps": float(config.get("norm_eps", 1e-5)), "rope_parameters": rope,
                "attention_bias": bias or attn_bias, "mlp_bias": bias, "attention_dropout": 0.0}
    act = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(config.get("gelu_approximate", "none"))
    if act is None:
        raise FormatUnsupported(f"{shown}: gelu_approximate {config.get('gelu_approximate')!r} is not litgpt's")
    return {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], **common,
            "hidden_act": act, "layer_norm_eps": float(config.get("norm_eps", 1e-5)),
            "use_parallel_residual": parallel, "rope_parameters": {**rope, "partial_rotary_factor": rotary},
            "attention_bias": bias or attn_bias, "attention_dropout": 0.0, "hidden_dropout": 0.0}


def _fused(which: str, n_heads: int, n_kv: int, head_dim: int, legacy: bool):
    """Out of litgpt's fused qkv (weight or bias; all query heads, then the keys, then the values):
    ``which`` "q", "k" or "v" (Llama's projections), or "per_head" (GPT-NeoX's ``query_key_value``,
    ``[q, k, v]`` of each head in turn). ``legacy``: the fused tensor is the legacy ``attn.attn``,
    laid out per query group (``[q_per_kv query heads, key, value]`` of each group in turn), which
    litgpt's own load hook regroups the same way (``qkv_reassemble``)."""
    per = n_heads // n_kv
    sizes = (n_heads * head_dim, n_kv * head_dim, n_kv * head_dim)

    def transform(parts: list[Any]) -> Any:
        import torch

        w = parts[0]
        rest = w.shape[1:]
        if legacy:
            g = w.reshape(n_kv, per + 2, head_dim, *rest)
            w = torch.cat([g[:, :per].reshape(-1, *rest), g[:, per].reshape(-1, *rest),
                           g[:, per + 1].reshape(-1, *rest)])
        if which == "per_head":
            heads = w.reshape(3, n_heads, head_dim, *rest).transpose(0, 1)
            return heads.reshape(3 * n_heads * head_dim, *rest).contiguous()
        return w.split(sizes)["qkv".index(which)].contiguous()

    return transform


def targets(tensors: dict[str, StoredTensor], config: dict[str, Any]) -> tuple[list[mapping.Target], list[str]]:
    """(one target per parameter of the transformers model of ``config``, sourced by litgpt's
    names; the checkpoint's tensors left out on purpose: a tied head's second name). A bias
    litgpt does not have is zeros. FormatUnsupported for a model type not mapped."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise FormatUnsupported(f"litgpt checkpoints are mapped onto transformers' {' and '.join(MODEL_TYPES)} "
                                f"architectures; --model-config names model_type {model_type!r}")
    d = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or d // n_heads)
    inter = int(config["intermediate_size"])
    dtype = tensors["transformer.wte.weight"].dtype if "transformer.wte.weight" in tensors else "float32"

    def rename(dst: str, src: str) -> mapping.Target:
        return mapping.Target(dst, (src,))

    def bias(dst: str, src: str, width: int) -> mapping.Target:
        return rename(dst, src) if src in tensors else mapping.Target(dst, (), mapping.zeros((width,), dtype))

    def fused(src: str, kind: str, which: str, width: int) -> tuple[str, mapping.Transform]:
        """The fused qkv ``kind`` (weight, bias) of the block ``src`` and how ``which`` comes out
        of it: ``attn.qkv``, or the legacy ``attn.attn``; a bias litgpt does not have is zeros."""
        name = f"{src}attn.qkv.{kind}"
        legacy = name not in tensors and f"{src}attn.attn.{kind}" in tensors
        if kind == "bias" and name not in tensors and not legacy:
            return (), mapping.zeros((width,), dtype)
        return ((f"{src}attn.attn.{kind}" if legacy else name),), _fused(which, n_heads, n_kv, head_dim, legacy)

    ignored: list[str] = []
    if config.get("tie_word_embeddings", False):
        head = "transformer.wte.weight"
        ignored += ["lm_head.weight"] if "lm_head.weight" in tensors else []
    else:
        head = "lm_head.weight"
    out: list[mapping.Target] = []
    if model_type == "llama":
        out += [rename("model.embed_tokens.weight", "transformer.wte.weight"),
                rename("model.norm.weight", "transformer.ln_f.weight"), rename("lm_head.weight", head)]
        for i in range(int(config["num_hidden_layers"])):
            src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
            for proj, width in (("q", n_heads * head_dim), ("k", n_kv * head_dim), ("v", n_kv * head_dim)):
                out.append(mapping.Target(f"{dst}self_attn.{proj}_proj.weight", *fused(src, "weight", proj, width)))
                if config.get("attention_bias"):
                    out.append(mapping.Target(f"{dst}self_attn.{proj}_proj.bias", *fused(src, "bias", proj, width)))
            out += [rename(f"{dst}self_attn.o_proj.weight", f"{src}attn.proj.weight"),
                    rename(f"{dst}input_layernorm.weight", f"{src}norm_1.weight"),
                    rename(f"{dst}post_attention_layernorm.weight", f"{src}norm_2.weight"),
                    rename(f"{dst}mlp.gate_proj.weight", f"{src}mlp.fc_1.weight"),
                    rename(f"{dst}mlp.up_proj.weight", f"{src}mlp.fc_2.weight"),
                    rename(f"{dst}mlp.down_proj.weight", f"{src}mlp.proj.weight")]
            if config.get("attention_bias"):
                out.append(bias(f"{dst}self_attn.o_proj.bias", f"{src}attn.proj.bias", d))
            if config.get("mlp_bias"):
                out += [bias(f"{dst}mlp.gate_proj.bias", f"{src}mlp.fc_1.bias", inter),
                        bias(f"{dst}mlp.up_proj.bias", f"{src}mlp.fc_2.bias", inter),
                        bias(f"{dst}mlp.down_proj.bias", f"{src}mlp.proj.bias", d)]
        return out, ignored
    # gpt_neox
    out += [rename("gpt_neox.embed_in.weight", "transformer.wte.weight"),
            rename("gpt_neox.final_layer_norm.weight", "transformer.ln_f.weight"),
            bias("gpt_neox.final_layer_norm.bias", "transformer.ln_f.bias", d), rename("lm_head.weight", head)]
    for i in range(int(config["num_hidden_layers"])):
        src, dst = f"transformer.h.{i}.", f"gpt_neox.layers.{i}."
        out += [mapping.Target(f"{dst}attention.query_key_value.weight", *fused(src, "weight", "per_head", 3 * d)),
                rename(f"{dst}attention.dense.weight", f"{src}attn.proj.weight"),
                rename(f"{dst}input_layernorm.weight", f"{src}norm_1.weight"),
                bias(f"{dst}input_layernorm.bias", f"{src}norm_1.bias", d),
                rename(f"{dst}post_attention_layernorm.weight", f"{src}norm_2.weight"),
                bias(f"{dst}post_attention_layernorm.bias", f"{src}norm_2.bias", d),
                rename(f"{dst}mlp.dense_h_to_4h.weight", f"{src}mlp.fc.weight"),
                bias(f"{dst}mlp.dense_h_to_4h.bias", f"{src}mlp.fc.bias", inter),
                rename(f"{dst}mlp.dense_4h_to_h.weight", f"{src}mlp.proj.weight"),
                bias(f"{dst}mlp.dense_4h_to_h.bias", f"{src}mlp.proj.bias", d)]
        if config.get("attention_bias", True):
            out += [mapping.Target(f"{dst}attention.query_key_value.bias", *fused(src, "bias", "per_head", 3 * d)),
                    bias(f"{dst}attention.dense.bias", f"{src}attn.proj.bias", d)]
    return out, ignored
