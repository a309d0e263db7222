"""A torch.distributed.checkpoint directory written the way FSDP2 training writes one: a tiny
Llama (transformers) sharded with ``fully_shard`` over 2 gloo ranks, three AdamW steps, then
``dcp.save`` of the model's and the optimizer's sharded state dicts (every tensor in two
``Shard(0)`` chunks, one per rank). Rank 0 also saves the full model state dict as
``OUT/oracle.safetensors``: what the reader must assemble.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/writers/dcp_fsdp2.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, HIDDEN, LAYERS = 384, 128, 2


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    for module in model.modules():
        if hasattr(module, "set_force_sum_reduction_for_comms"):  # gloo has no PREMUL_SUM
            module.set_force_sum_reduction_for_comms(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    data = torch.Generator().manual_seed(1 + rank)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (2, 16), generator=data)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt),
             "train_state": {"step": 3}}
    dcp.save(state, checkpoint_id=str(out / "step-3"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, str(out / "oracle.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
