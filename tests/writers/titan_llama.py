"""A training checkpoint written by torchtitan 0.3.0's own code: a tiny Llama-3 (torchtitan's
``Llama3Model`` built with its llama3 layer builder: fused ``wqkv``, ComplexRoPE without long-context
scaling, untied ``lm_head``) sharded with torchtitan's ``apply_fsdp_to_decoder`` (FSDP2) over 2 gloo
ranks, three steps with torchtitan's AdamW ``OptimizersContainer`` (foreach), its warmup/decay
``LRSchedulersContainer``, its cross-entropy loss and ``clip_grad_norm_``, fed by its
``ParallelAwareDataloader`` (random token batches, seeded differently per rank), then saved by its
``CheckpointManager`` at the last step with the whole training state (``last_save_model_only=False``):
``OUT/step-3/`` (``.metadata``, ``__0_0.distcp``, ``__1_0.distcp``) holding the model's keys flat
beside ``optimizer.*``, ``lr_scheduler.*``, ``dataloader.*`` and ``train_state.*``.

Replaced for CPU: each layer's inner attention is torchtitan's own ``ScaledDotProductAttention``
(causal; no parameters, so the checkpoint is unchanged) instead of FlexAttention, which has no backward
on CPU; FSDP reduces with a plain sum (gloo has no PREMUL_SUM); parameters stay float32.

Rank 0 also writes
  ``OUT/config.json``: the equivalent transformers ``LlamaConfig``, as a user would write it by hand;
  ``OUT/oracle.safetensors``: the full model state dict in torchtitan's names as the checkpoint holds
  them (gathered, float32);
  ``OUT/oracle_forward.safetensors``: ``tokens`` (int64 [2, 32], seeded) and ``logits`` (float32
  [2, 32, vocab]) from an unsharded torchtitan model loaded with that state dict, in eval mode.

torchtitan is not a dependency of the project: tests/framework_fixtures.py installs it into a private
directory and runs this with that directory on PYTHONPATH. ``write`` (the training, the save and the
oracles) is shared with tests/writers/titan_qwen3.py, which builds a tiny Qwen-3 instead.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/writers/titan_llama.py OUT
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from titan_common import RandomTokens, TrainState, exit_now
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torchtitan.components.checkpoint import MODEL, CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.loss import IGNORE_INDEX, CrossEntropyLoss
from torchtitan.components.optimizer import default_adamw
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.fsdp import apply_fsdp_to_decoder
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.common.decoder import Decoder
from torchtitan.models.llama3 import (
    _EMBEDDING_INIT,
    _NORM_INIT,
    Llama3Model,
    _build_llama3_layers,
    _output_linear_init,
)

VOCAB, DIM, N_HEADS, N_KV_HEADS, LAYERS = 384, 128, 4, 2, 2
FFN_HIDDEN = compute_ffn_hidden_dim(DIM, multiple_of=32)  # int(8 * 128 / 3) = 341 -> 352
ROPE_THETA, MAX_SEQ_LEN, NORM_EPS = 500000.0, 128, 1e-5
STEPS, BATCH, SEQ = 3, 2, 32


def model_config() -> Llama3Model.Config:
    """Built the way llama3_configs' flavors are (torchtitan's _build_llama3_layers: fused wqkv,
    depth-scaled init), with the tiny sizes, no RoPE scaling, and SDPA as the inner attention."""
    rope = ComplexRoPE.Config(dim=DIM // N_HEADS, max_seq_len=MAX_SEQ_LEN, theta=ROPE_THETA, scaling="none")
    layers = _build_llama3_layers(n_layers=LAYERS, dim=DIM, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS,
                                  hidden_dim=FFN_HIDDEN, rope=rope, fuse_qkv=True, attn_backend="flex")
    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
        layer.attention_norm.eps = layer.ffn_norm.eps = NORM_EPS
    norm = RMSNorm.Config(normalized_shape=DIM, eps=NORM_EPS, param_init=_NORM_INIT)
    return Llama3Model.Config(
        dim=DIM, vocab_size=VOCAB, enable_weight_tying=False,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=_EMBEDDING_INIT),
        norm=norm, lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=_output_linear_init(DIM)),
        layers=layers)


def hf_config() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": DIM, "intermediate_size": FFN_HIDDEN, "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV_HEADS, "head_dim": DIM // N_HEADS, "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB, "rms_norm_eps": NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "max_position_embeddings": MAX_SEQ_LEN, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }


def build_unsharded(model_config: Callable[[], Decoder.Config], state: dict[str, torch.Tensor]) -> Decoder:
    with torch.device("meta"):
        model = model_config().build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)  # the RoPE cache
    model.load_state_dict(state, strict=True)  # FusedQKVLinear merges wq/wk/wv back into wqkv
    return model.eval()


def write(out: Path, model_config: Callable[[], Decoder.Config], hf_config: dict[str, Any]) -> None:
    """Train the model ``model_config`` builds (torchtitan's ``Decoder``) and save it, as the module
    says, with ``hf_config`` as ``OUT/config.json``."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    torch.manual_seed(0)

    # As torchtitan's Trainer: meta-device build, parallelize, materialize, init.
    with torch.device("meta"):
        model = model_config().build()
    model.verify_module_protocol()
    apply_fsdp_to_decoder(model, mesh, param_dtype=torch.float32, reduce_dtype=torch.float32, pp_enabled=False)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # gloo has no PREMUL_SUM
            module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()

    optimizer_config = default_adamw(lr=1e-2)
    optimizer_config.implementation = "foreach"  # "fused" (the default) is CUDA only
    optimizers = optimizer_config.build(model_parts=[model])
    lr_schedulers = LRSchedulersContainer.Config(warmup_steps=1).build(optimizers=optimizers, training_steps=STEPS)
    loss_fn = CrossEntropyLoss.Config().build(compile_config=None)
    dataloader = ParallelAwareDataloader(RandomTokens(seed=1 + rank, vocab=VOCAB, seq=SEQ), dp_rank=rank,
                                         dp_world_size=world, batch_size=BATCH)
    train_state = TrainState()
    checkpointer = CheckpointManager.Config(enable=True, folder=str(out), last_save_model_only=False).build(
        dataloader=dataloader, model_parts=[model], optimizers=optimizers, lr_schedulers=lr_schedulers,
        states={"train_state": train_state}, sd_adapter=None)

    # Trainer.train / train_step, one microbatch per step.
    batches = iter(dataloader)
    while train_state.step < STEPS:
        train_state.step += 1
        optimizers.zero_grad()
        input_dict, labels = next(batches)
        train_state.ntokens_seen += labels.numel()
        global_valid_tokens = dist_utils.dist_sum_tensor((labels != IGNORE_INDEX).sum(), mesh)
        loss, _ = loss_fn(model(input_dict["input"]), labels, global_valid_tokens)
        loss.backward()
        dist_utils.clip_grad_norm_(list(model.parameters()), 1.0, foreach=True)
        optimizers.step()
        lr_schedulers.step()
        checkpointer.save(train_state.step, last_step=train_state.step == STEPS)
    checkpointer.close()

    # The oracle: the model state exactly as the checkpointer handed it to DCP, gathered.
    saved = checkpointer.states[MODEL].state_dict()
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().contiguous() for k, v in saved.items()}
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1234))
    model.eval()
    with torch.no_grad():
        sharded_logits = model(tokens)  # every rank takes part in FSDP's all-gathers
    if rank == 0:
        ckpt = out / f"step-{STEPS}"
        reread = {k: torch.empty_like(v) for k, v in full.items()}
        dcp.load(reread, checkpoint_id=str(ckpt), no_dist=True)
        for k, v in full.items():
            assert torch.equal(reread[k], v), f"checkpoint's {k} differs from the gathered state"
        with torch.no_grad():
            logits = build_unsharded(model_config, full)(tokens).float()
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, sharded_logits.float(), rtol=1e-4, atol=1e-5)
        save_file({k: v.float() for k, v in full.items()}, str(out / "oracle.safetensors"))
        save_file({"tokens": tokens, "logits": logits.contiguous()}, str(out / "oracle_forward.safetensors"))
        (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    write(Path(sys.argv[1]), model_config, hf_config())
    exit_now()
