"""What the metrics between checkpoints and the logit lens cost, against a plain scoring job.

    python bench/dynamics_bench.py                    # d=576, 12 blocks, vocab 49,152, 4,096 tokens
    python bench/dynamics_bench.py --layers 6 --tokens 2048   # a quick look

Two checkpoints of one random-init Llama (the SmolLM-135M block shape, fewer blocks), the
second the first with its weights moved by noise, are written once to the work directory.
Then, in this process, one after another, each timed by the job's own clock
(``ScoreResult.timings``, loading included in ``total_s``):

  plain      score_checkpoint(second): the base metrics (linearity ... massive_activation)
  lens       the same with logit_lens=True: ``logit_lens_s`` against the plain job's time
  dynamics   the same with compare_to=first: weight_update per block, then drift_cka (the
             first checkpoint loaded beside the second and run on the same batches)
  w_update   dynamics.weight_updates(second, first) alone, against reading both
             checkpoints' weight files once (the bytes it must read; page cache warm for both)

Targets (docs/engine.md): a job with dynamics within 2.1 × a plain job; weight_update within
1.2 × reading the two checkpoints' bytes. One torch thread per core this machine has.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(path: Path, *, hidden: int, layers: int, vocab: int, seed: int, move_from: Path | None = None) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "model.safetensors").exists():
        return path
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=vocab, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    if move_from is not None:
        earlier = LlamaForCausalLM.from_pretrained(move_from)
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), earlier.named_parameters(), strict=True):
                p.copy_(q + 0.05 * q.abs().mean() * torch.randn_like(q))
    model.save_pretrained(path)
    return path


def tokenizer_dir(workdir: Path, vocab: int) -> Path:
    """The tests' tokenizer (trained on the built-in probe), at most 4,096 entries (ids below the
    model's vocabulary)."""
    out = workdir / f"tokenizer-{vocab}"
    if (out / "tokenizer.json").exists():
        return out
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_models import train_tokenizer

    train_tokenizer(min(vocab, 4096)).save_pretrained(out)
    return out


def read_all(paths: list[Path]) -> tuple[int, float]:
    t = time.perf_counter()
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                n += len(chunk)
    return n, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--workdir", default=os.environ.get("LAYERTRACK_BENCH_DIR", "/tmp/layertrack-bench"))
    args = p.parse_args()

    import torch
    from layertrack.workers import dynamics
    from layertrack.workers.scoring import ScoreConfig, score_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.workdir) / f"dyn-{args.hidden}x{args.layers}-v{args.vocab}"
    work.mkdir(parents=True, exist_ok=True)
    log(f"building two checkpoints in {work} ...")
    first = build(work / "first", hidden=args.hidden, layers=args.layers, vocab=args.vocab, seed=0)
    second = build(work / "second", hidden=args.hidden, layers=args.layers, vocab=args.vocab, seed=1,
                   move_from=first)
    tok = tokenizer_dir(Path(args.workdir), args.vocab)
    base = dict(max_tokens=args.tokens, seq_len=args.seq_len, dtype="float32")

    def job(**extra):
        r = score_checkpoint(str(second), config=ScoreConfig(**base, **extra), tokenizer_path=str(tok))
        return r

    job()  # warm: imports, page cache, allocator
    log("plain ...")
    plain = job()
    log("logit lens ...")
    lens = job(logit_lens=True)
    log("dynamics (weight_update, drift_cka) ...")
    dyn = job(compare_to=str(first))
    files = [first / "model.safetensors", second / "model.safetensors"]
    read_all(files)  # warm the page cache for both
    n_bytes, t_read = read_all(files)
    t = time.perf_counter()
    dynamics.weight_updates(second, first)
    t_update = time.perf_counter() - t

    params = sum(f.stat().st_size for f in [second / "model.safetensors"]) / 4 / 1e6
    print(f"model: Llama d={args.hidden}, {args.layers} blocks, vocab {args.vocab}, {params:.1f} M parameters "
          f"(float32); {plain.scores.n_tokens} tokens at seq_len {args.seq_len}; {torch.get_num_threads()} threads")
    p_total = plain.timings["total_s"]
    print(f"plain job: {p_total:.2f} s (load {plain.timings['load_s']:.2f} s, score {plain.timings['score_s']:.2f} s)")
    print(f"job with the logit lens: {lens.timings['total_s']:.2f} s, {lens.timings['total_s'] / p_total:.2f} x the "
          f"plain job (the lens itself {lens.timings['logit_lens_s']:.2f} s)")
    drift_s = dyn.dynamics["drift_cka"].get("seconds")
    print(f"job with dynamics: {dyn.timings['total_s']:.2f} s, {dyn.timings['total_s'] / p_total:.2f} x the plain job "
          f"(target <= 2.1 x; drift_cka {drift_s:.2f} s of it)")
    print(f"weight_update alone: {t_update:.2f} s; reading both checkpoints' {n_bytes / 2**20:.0f} MiB once "
          f"(warm cache): {t_read:.2f} s; {t_update / t_read:.2f} x (target <= 1.2 x)")


if __name__ == "__main__":
    main()
