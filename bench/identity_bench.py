"""The cost of a local checkpoint's identity (workers/checkpoint.py, ``IDENTITY``) on a
multi-GB checkpoint, against a scoring job of the same checkpoint.

    python bench/identity_bench.py                        # ~2.5 GB checkpoint; 3 to 5 min on 2 cores
    python bench/identity_bench.py --dir /tmp/lt-identity-bench   # kept for the next run (default)
    python bench/identity_bench.py --layers 4                     # smaller and quicker

The checkpoint is a random-init Llama (d = 2048, MLP 5632, 16 heads, 4 KV heads, ``--layers``
blocks, the tiny models' 384-token vocabulary) in float32, saved in shards of 1 GB, built once
in ``--dir``. Printed:

  identity, warm   median over ``--reps`` calls of ``inspect_checkpoint`` (what the API does per
                   submission: config, every header checked, the identity) with the files in the
                   page cache
  identity, cold   the same after each file's pages were dropped (posix_fadvise DONTNEED) before
                   every call: what a submission costs when the checkpoint was just written and
                   evicted, or lives on a network filesystem
  bytes read       what the identity reads: headers + IDENTITY_SAMPLES × IDENTITY_SAMPLE_BYTES
                   per weight file
  scoring job      one ``score_checkpoint`` of the checkpoint (``--tokens`` probe tokens in
                   sequences of 256), which computes the identity again at its start and end
  share            (2 × cold identity) ÷ scoring job (target: a few percent at most)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny_models


def build(directory: Path, layers: int) -> Path:
    shape = {"hidden": 2048, "intermediate": 5632, "heads": 16, "kv_heads": 4, "layers": layers, "vocab": 384}
    marker = directory / "bench-shape.json"
    if marker.is_file() and marker.read_text() == json.dumps(shape):
        return directory
    import torch
    from safetensors.torch import save_file
    from tiny_models import train_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    print(f"building the benchmark checkpoint in {directory} ...", flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        old.unlink()
    tok = train_tokenizer(shape["vocab"])
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=layers, num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"], max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    names = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shp in names:
        t = torch.randn(shp, generator=gen) * (1.0 if "norm" in name else 0.02)
        if "norm" in name:
            t = 1.0 + 0.1 * t
        current[name] = t
        size += t.numel() * 4
        if size >= 1 << 30:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * 4 for s in shards for t in s.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(directory)
    tok.save_pretrained(directory)
    marker.write_text(json.dumps(shape))
    return directory


def drop_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/lt-identity-bench"))
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()

    import torch
    from layertrack.workers.checkpoint import IDENTITY_SAMPLE_BYTES, IDENTITY_SAMPLES, inspect_checkpoint
    from layertrack.workers.scoring import ScoreConfig, score_checkpoint
    from layertrack.workers.streaming import read_header

    torch.set_num_threads(1)
    ckpt = build(args.dir, args.layers)
    files = sorted(ckpt.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    header_bytes = sum(read_header(f)[1] for f in files)
    print(f"checkpoint: {len(files)} weight files, {total / 2**30:.2f} GiB; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)

    def once() -> float:
        t = time.perf_counter()
        inspect_checkpoint(ckpt, check_causal_lm=False)
        return time.perf_counter() - t

    once()
    warm = statistics.median(once() for _ in range(args.reps))
    cold = []
    for _ in range(args.reps):
        drop_cache(files)
        cold.append(once())
    cold_s = statistics.median(cold)
    read = header_bytes + len(files) * IDENTITY_SAMPLES * IDENTITY_SAMPLE_BYTES
    print(f"identity, warm   {warm * 1e3:8.2f} ms (median of {args.reps})")
    print(f"identity, cold   {cold_s * 1e3:8.2f} ms (median of {args.reps}; range {min(cold) * 1e3:.2f} to "
          f"{max(cold) * 1e3:.2f} ms)")
    print(f"bytes read       {read / 1024:8.1f} KiB of {total / 2**30:.2f} GiB", flush=True)
    t = time.perf_counter()
    score_checkpoint(str(ckpt), config=ScoreConfig(max_tokens=args.tokens, seq_len=256, execution="resident"))
    job = time.perf_counter() - t
    print(f"scoring job      {job:8.1f} s ({args.tokens} tokens, resident, 1 torch thread)")
    print(f"share            {2 * cold_s / job * 100:8.3f} % (identity twice, cold, ÷ the job)")


if __name__ == "__main__":
    main()
