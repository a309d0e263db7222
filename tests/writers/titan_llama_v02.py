"""A training checkpoint written by torchtitan 0.2.2's own code (the release before 0.3, whose names
are ``layers.N.attention.wq`` and ``output``): a tiny Llama-3 (its ``Transformer`` from
``TransformerModelArgs``, separate ``wq``/``wk``/``wv``, complex RoPE with the llama3 long-context
scaling every 0.2.x flavor applies, untied ``output``) parallelized by its ``parallelize_llama``
(FSDP2 over 2 gloo ranks, ``ParallelDims.build_mesh``), three steps with its AdamW
``OptimizersContainer`` (foreach), its warmup/decay ``LRSchedulersContainer``, its sum cross-entropy
over the global token count and ``clip_grad_norm_``, fed by its ``ParallelAwareDataloader`` (random
token batches, seeded differently per rank), then saved by its ``CheckpointManager`` (constructed
from a ``JobConfig``'s checkpoint section) at the last step with the whole training state
(``last_save_model_only=False``): ``OUT/step-3/`` holding the model's keys flat beside
``optimizer.*``, ``lr_scheduler.*``, ``dataloader.*`` and ``train_state.*``.

Replaced for CPU: the device mesh is built on "cpu" (0.2.2's ``ParallelDims`` takes its module's
``device_type``, which is "cuda" when no accelerator is found); FSDP reduces with a plain sum (gloo has
no PREMUL_SUM); parameters stay float32. The attention is 0.2.2's default, SDPA (causal).

Rank 0 also writes
  ``OUT/config.json``: the equivalent transformers ``LlamaConfig``, as a user would write it by hand
  (``rope_parameters`` of type ``llama3`` with 0.2.2's ``RoPEScalingArgs`` defaults);
  ``OUT/oracle_forward.safetensors``: ``tokens`` (int64 [2, 32], seeded) and ``logits`` (float32
  [2, 32, vocab]) from an unsharded torchtitan 0.2.2 model loaded with the saved state, in eval mode.

torchtitan 0.2.2 is not a dependency of the project: tests/framework_fixtures.py installs it into a
private directory and runs this with that directory on PYTHONPATH.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/writers/titan_llama_v02.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from titan_common import RandomTokens, TrainState, exit_now
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torchtitan.components.checkpoint import MODEL, CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.loss import IGNORE_INDEX, build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import parallel_dims as titan_parallel_dims
from torchtitan.distributed import utils as dist_utils
from torchtitan.models.llama3 import Transformer, TransformerModelArgs, parallelize_llama
from torchtitan.models.llama3.model.args import RoPEScalingArgs

VOCAB, DIM, N_HEADS, N_KV_HEADS, LAYERS, MULTIPLE_OF = 384, 128, 4, 2, 2, 32
FFN_HIDDEN = MULTIPLE_OF * ((int(2 * 4 * DIM / 3) + MULTIPLE_OF - 1) // MULTIPLE_OF)  # 341 -> 352, as FeedForward
ROPE_THETA, MAX_SEQ_LEN, NORM_EPS = 500000.0, 128, 1e-5
STEPS, BATCH, SEQ = 3, 2, 32


def model_args() -> TransformerModelArgs:
    """As llama3_args' flavors (SDPA, causal), with the tiny sizes; the RoPE scaling is the default."""
    return TransformerModelArgs(dim=DIM, n_layers=LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, vocab_size=VOCAB,
                                multiple_of=MULTIPLE_OF, norm_eps=NORM_EPS, rope_theta=ROPE_THETA,
                                max_seq_len=MAX_SEQ_LEN)


def hf_config() -> dict[str, Any]:
    scaling = RoPEScalingArgs()
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": DIM, "intermediate_size": FFN_HIDDEN, "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV_HEADS, "head_dim": DIM // N_HEADS, "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB, "rms_norm_eps": NORM_EPS,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": ROPE_THETA, "factor": scaling.scaling_factor,
                            "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
                            "original_max_position_embeddings": scaling.original_max_position_embeddings},
        "max_position_embeddings": MAX_SEQ_LEN, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }


def job_config(out: Path) -> JobConfig:
    job = JobConfig()
    job.job.dump_folder = str(out)
    job.checkpoint.enable, job.checkpoint.folder, job.checkpoint.last_save_model_only = True, "", False
    job.optimizer.lr, job.optimizer.implementation = 1e-2, "foreach"  # "fused" (the default) is CUDA only
    job.lr_scheduler.warmup_steps = 1
    job.training.steps, job.training.seq_len, job.training.local_batch_size = STEPS, SEQ, BATCH
    job.training.max_norm, job.training.mixed_precision_param = 1.0, "float32"
    return job


def write(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    job = job_config(out)
    titan_parallel_dims.device_type = "cpu"  # 0.2.2 takes "cuda" when no accelerator is found
    parallel_dims = ParallelDims(dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=world)
    parallel_dims.build_mesh()
    torch.manual_seed(0)

    # As 0.2.2's Trainer: meta-device build, parallelize, materialize, init.
    with torch.device("meta"):
        model = Transformer(model_args())
    parallelize_llama(model, parallel_dims, job)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # gloo has no PREMUL_SUM
            module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()

    optimizers = build_optimizers([model], job.optimizer, parallel_dims)
    lr_schedulers = build_lr_schedulers(optimizers, job.lr_scheduler, job.training.steps)
    loss_fn = build_cross_entropy_loss(job)
    dataloader = ParallelAwareDataloader(RandomTokens(seed=1 + rank, vocab=VOCAB, seq=SEQ), dp_rank=rank,
                                         dp_world_size=world, batch_size=BATCH)
    train_state = TrainState()
    checkpointer = CheckpointManager(dataloader=dataloader, model_parts=[model], optimizers=optimizers,
                                     lr_schedulers=lr_schedulers, states={"train_state": train_state},
                                     checkpoint_config=job.checkpoint, sd_adapter=None,
                                     base_folder=job.job.dump_folder)

    # Trainer.train / train_step, one microbatch per step.
    batches = iter(dataloader)
    batch_mesh = parallel_dims.get_mesh("batch")
    while train_state.step < STEPS:
        train_state.step += 1
        optimizers.zero_grad()
        input_dict, labels = next(batches)
        train_state.ntokens_seen += labels.numel()
        global_valid_tokens = dist_utils.dist_sum((labels != IGNORE_INDEX).sum(), batch_mesh)
        loss = loss_fn(model(input_dict["input"]), labels) / global_valid_tokens
        loss.backward()
        dist_utils.clip_grad_norm_(list(model.parameters()), job.training.max_norm, foreach=True)
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
        with torch.device("meta"):
            plain = Transformer(model_args())
        plain.to_empty(device="cpu")
        with torch.no_grad():
            plain.init_weights(buffer_device=None)  # the RoPE cache
            plain.load_state_dict(full, strict=True)
            logits = plain.eval()(tokens).float()
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, sharded_logits.float(), rtol=1e-4, atol=1e-5)
        save_file({"tokens": tokens, "logits": logits.contiguous()}, str(out / "oracle_forward.safetensors"))
        (out / "config.json").write_text(json.dumps(hf_config(), indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    write(Path(sys.argv[1]))
    exit_now()
