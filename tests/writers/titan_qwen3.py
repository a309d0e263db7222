"""A training checkpoint written by torchtitan 0.3.0's own code: a tiny dense Qwen-3 (torchtitan's
``Qwen3Model`` built with its qwen3 layer builder: fused ``wqkv``, per-head ``q_norm``/``k_norm``
before RoPE, cos/sin RoPE (``CosSinRoPE``, the rotate-half convention), RMSNorm eps 1e-6, an explicit
``head_dim`` wider than ``dim / n_heads`` as Qwen-3's own sizes have it, untied ``lm_head``, no MoE),
trained and saved exactly as tests/writers/titan_llama.py trains and saves its Llama-3 (that module's
``write``: FSDP2 over 2 gloo ranks, three AdamW steps, torchtitan's CheckpointManager with the whole
training state), with the same outputs: ``OUT/step-3/``, ``OUT/config.json`` (here the equivalent
transformers ``Qwen3Config``), ``OUT/oracle.safetensors`` and ``OUT/oracle_forward.safetensors``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/writers/titan_qwen3.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from titan_common import exit_now
from titan_llama import DIM, LAYERS, MAX_SEQ_LEN, N_HEADS, N_KV_HEADS, VOCAB, write
from torchtitan.models.common import CosSinRoPE, Embedding, Linear
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.qwen3 import (
    _EMBEDDING_INIT,
    _EPS,
    _LINEAR_INIT,
    Qwen3Model,
    _build_qwen3_layers,
    _qwen3_norm,
)

HEAD_DIM = 64  # n_heads * head_dim = 256 != dim, as in Qwen-3 0.6B (16 * 128 vs 1024)
FFN_HIDDEN = 352
ROPE_THETA = 1000000.0


def model_config() -> Qwen3Model.Config:
    """Built the way qwen3_configs' dense flavors are (torchtitan's _build_qwen3_layers), with the tiny
    sizes, an untied head (initialised as the 8B's is) and SDPA as the inner attention."""
    rope = CosSinRoPE.Config(dim=HEAD_DIM, max_seq_len=MAX_SEQ_LEN, theta=ROPE_THETA)
    layers = _build_qwen3_layers(n_layers=LAYERS, dim=DIM, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS,
                                 head_dim=HEAD_DIM, hidden_dim=FFN_HIDDEN, fuse_qkv=True, attn_backend="flex",
                                 rope=rope)
    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return Qwen3Model.Config(
        vocab_size=VOCAB, dim=DIM, norm=_qwen3_norm(DIM), enable_weight_tying=False,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=_EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=_LINEAR_INIT),
        layers=layers)


def hf_config() -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": DIM, "intermediate_size": FFN_HIDDEN, "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV_HEADS, "head_dim": HEAD_DIM, "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB, "rms_norm_eps": _EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "max_position_embeddings": MAX_SEQ_LEN, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": LAYERS, "torch_dtype": "float32",
    }


if __name__ == "__main__":
    write(Path(sys.argv[1]), model_config, hf_config())
    exit_now()
