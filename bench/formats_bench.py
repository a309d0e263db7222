"""Reading training-framework checkpoints: bytes and time for the model's tensors alone.

    python bench/formats_bench.py                 # Llama d=576, 12 blocks (70.8 M parameters)
    python bench/formats_bench.py --layers 4      # a quick look

Writes one model's weights two ways into the work directory, each with AdamW's two moments
beside them as training saves them (the model is a third of the bytes):

  dcp        torch.distributed.checkpoint ``dcp.save`` of {"model": state dict (transformers
             names), "optimizer": {exp_avg, exp_avg_sq per parameter}} (one process: one
             chunk per tensor)
  nanogpt    ``ckpt.pt`` as nanoGPT's train.py saves it (model, optimizer, model_args, ...),
             the GPT-2 shape of the same width and depth

Then, for each: the checkpoint's bytes, the bytes layertrack reads of it through
``os.pread`` to build the model (``workers/formats``: the model tensors' byte ranges and the
pickle of ``ckpt.pt``; DCP's small ``.metadata`` is read whole besides), the model's bytes,
the time to index it and to build the model (page cache warm, as after a first read), and
the time to read the whole checkpoint once (what a reader that loads everything reads).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_all(paths: list[Path]) -> float:
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - t


class Counting:
    """Counts the bytes the format readers read (os.pread and file reads of the checkpoint)."""

    def __init__(self, root: Path):
        self.root, self.n = str(root), 0

    def __enter__(self):
        import builtins

        self._pread, self._open = os.pread, builtins.open
        counter = self

        def pread(fd, length, offset):
            data = counter._pread(fd, length, offset)
            if os.readlink(f"/proc/self/fd/{fd}").startswith(counter.root):
                counter.n += len(data)
            return data

        os.pread = pread
        return self

    def __exit__(self, *exc):
        os.pread = self._pread


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--workdir", default=os.environ.get("LAYERTRACK_BENCH_DIR", "/tmp/layertrack-bench"))
    args = p.parse_args()

    import torch
    import torch.distributed.checkpoint as dcp
    from layertrack.workers.formats import native
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    work = Path(args.workdir) / f"formats-{args.hidden}x{args.layers}-v{args.vocab}"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    llama_cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                            num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
                            vocab_size=args.vocab, max_position_embeddings=2048)
    if not (work / "nanogpt" / "ckpt.pt").exists():
        log("writing the checkpoints ...")
        llama = LlamaForCausalLM(llama_cfg)
        state = llama.state_dict()
        moments = {f"{n}.{m}": torch.randn_like(t) for n, t in state.items() for m in ("exp_avg", "exp_avg_sq")}
        dcp.save({"model": state, "optimizer": moments}, storage_writer=dcp.FileSystemWriter(str(work / "dcp")),
                 no_dist=True)
        gpt = GPT2LMHeadModel(GPT2Config(n_embd=args.hidden, n_layer=args.layers, n_head=9, vocab_size=args.vocab,
                                         n_positions=1024, bos_token_id=None, eos_token_id=None))
        # nanoGPT's names: its Linear weights are the transpose of GPT-2's Conv1D ones
        conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        model = {n: (t.t().contiguous() if n.endswith(conv) else t) for n, t in gpt.state_dict().items()
                 if not n.endswith(".attn.bias") and not n.endswith(".attn.masked_bias")}
        model["lm_head.weight"] = model["transformer.wte.weight"]
        (work / "nanogpt").mkdir(exist_ok=True)
        torch.save({"model": model,
                    "optimizer": {"state": {i: {"exp_avg": torch.randn_like(t), "exp_avg_sq": torch.randn_like(t)}
                                            for i, t in enumerate(model.values())}, "param_groups": []},
                    "model_args": {"n_layer": args.layers, "n_head": 9, "n_embd": args.hidden, "block_size": 1024,
                                   "bias": True, "vocab_size": args.vocab, "dropout": 0.0},
                    "iter_num": 1000, "best_val_loss": 3.0, "config": {}}, work / "nanogpt" / "ckpt.pt")
    (work / "llama.json").write_text(llama_cfg.to_json_string())

    def files(d: Path) -> list[Path]:
        return [f for f in d.iterdir() if f.is_file()]

    rows = []
    for name, path, cfg in (("dcp", work / "dcp", work / "llama.json"), ("nanogpt", work / "nanogpt", None)):
        size = sum(f.stat().st_size for f in files(path))
        read_all(files(path))  # warm the page cache
        t_all = read_all(files(path))
        with Counting(path) as counted:
            t = time.perf_counter()
            ckpt = native.open_native(path, model_config=cfg)
            t_index = time.perf_counter() - t
            model = native.build_model(ckpt, dtype=torch.float32, with_lm_head=True)
            t_build = time.perf_counter() - t
        n_model = sum(v.numel() * v.element_size() for v in model.parameters())  # a tied head once
        rows.append((name, size, counted.n, n_model, t_index, t_build, t_all))
        del model, ckpt
    mib = 2**20
    print(f"model: Llama d={args.hidden}, {args.layers} blocks, vocab {args.vocab} (dcp); GPT-2 of the same width and "
          "depth (nanogpt); float32, AdamW's two moments beside the weights; page cache warm")
    print(f"{'format':<8} {'checkpoint':>12} {'read':>12} {'model':>12} {'read/model':>10} {'index':>8} "
          f"{'build':>8} {'read all':>9}")
    for name, size, read, n_model, t_index, t_build, t_all in rows:
        print(f"{name:<8} {size / mib:>8.1f} MiB {read / mib:>8.1f} MiB {n_model / mib:>8.1f} MiB "
              f"{read / n_model:>10.3f} {t_index:>7.2f}s {t_build:>7.2f}s {t_all:>8.2f}s")


if __name__ == "__main__":
    main()
