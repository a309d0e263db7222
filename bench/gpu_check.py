"""A check of a CUDA host: forward throughput, what the statistics cost, device memory, streaming.

    python bench/gpu_check.py          # one GPU, under 5 minutes; without CUDA: says so, exits 0
    python bench/gpu_check.py --cpu    # the same measurements on the CPU with a tiny model
                                       # (checks the script on a machine without a GPU)

It builds its own random-init Llama (nothing from the hub; the byte-level BPE of
tests/tiny_models.train_tokenizer, vocabulary 384), saved as a safetensors checkpoint in
``--dir`` (default: a temporary directory, removed at the end). CUDA default: d=2048, 16
blocks, MLP 5632, 16 heads / 8 KV heads, 755 M parameters, saved in bfloat16 (1.5 GB);
32768 probe tokens in sequences of 512, on ``--device`` (default cuda:0: one device, even
on a machine with several). Needs about 7 GB of device memory; ``--hidden``, ``--layers``
and ``--tokens`` make it smaller. ``--cpu``: d=256, 8 blocks, 4096 tokens of 256, float32,
``--threads`` torch threads (default 1: two OpenMP threads on two cores that other work
shares spend most of their time waiting for each other).

Every job runs in the job's default dtype for the device (bfloat16 on CUDA when supported,
else float16; float32 on the CPU) and default batch (16384 tokens on CUDA, 1024 on the
CPU), after a warm-up job (CUDA context, cuBLAS handles, kernels). Printed:

  forward           tokens/s of the bare forward pass of the base model (no hooks, nothing
                    kept), over the same probe tokens in the same batches; best of 3
  per job           (``score_checkpoint``) load s and score s (``ScoreResult.timings``);
                    statistics share = 1 − (the bare forward's time for the job's tokens) /
                    score s, i.e. the share of the scoring time that is not the forward pass:
                    the float64 statistics (the default), then ``gemm_precision="float32"``
  peak memory       CUDA: ``torch.cuda.max_memory_allocated`` during the job, above what was
                    allocated before it; CPU: peak RSS above the RSS before it (VmHWM reset
                    through /proc/self/clear_refs). Next to it the plan's prediction
                    (``peak_bytes + stats_bytes``)
  streamed          the same model with ``execution="streamed"`` (it fits: the plan would
                    keep it resident): its time over the resident job's, and max |Δscore|
                    vs resident over every base metric (expected: 0)
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny_models

from score_vs_reference import rss_kib  # bench/ is on the path when run as a script

CUDA_SHAPE = dict(hidden=2048, intermediate=5632, layers=16, heads=16, kv_heads=8, vocab=384)
CPU_SHAPE = dict(hidden=256, intermediate=688, layers=8, heads=4, kv_heads=2, vocab=384)
MIB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(directory: Path, shape: dict, *, dtype: str, device: str) -> Path:
    import torch
    from tiny_models import train_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    log(f"building a random-init model in {directory} ...")
    tok = train_tokenizer(shape["vocab"])
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"], max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):  # initialised on the GPU when there is one: seconds instead of a minute
        model = LlamaForCausalLM(cfg)
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    tok.save_pretrained(directory)
    del model
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return directory


# ---------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a block of code above what was in use before it: device memory on
    CUDA (the caching allocator's allocated bytes), RSS on the CPU."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = rss_kib("VmRSS") * 1024
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak = rss_kib("VmHWM") * 1024 - self._base


# ---------------------------------------------------------------- measurements
def bare_forward(ckpt: Path, *, device, dtype, tokens, repeat: int = 3) -> float:
    """Seconds of the best of ``repeat`` bare forward passes over ``tokens`` (the job's batches)."""
    import torch
    from layertrack.workers import checkpoint as C
    from layertrack.workers.scoring import _mask_or_none, _sequences_per_batch

    model = C.load_model(C.inspect_checkpoint(ckpt), device=device, dtype=dtype)
    ids = torch.tensor(tokens.input_ids, dtype=torch.long)
    attn = torch.tensor(tokens.attention_mask, dtype=torch.long)
    bs = _sequences_per_batch(tokens, None, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = float("inf")
    with torch.inference_mode():
        model(input_ids=ids[:bs].to(device), attention_mask=_mask_or_none(attn[:bs], device), use_cache=False)
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            for s in range(0, ids.shape[0], bs):
                model(input_ids=ids[s:s + bs].to(device), attention_mask=_mask_or_none(attn[s:s + bs], device),
                      use_cache=False)
            sync()
            best = min(best, time.perf_counter() - t0)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return best


def job(ckpt: Path, config, device) -> tuple[object, int]:
    from layertrack.workers.scoring import score_checkpoint

    with PeakMemory(device) as mem:
        result = score_checkpoint(str(ckpt), config=config)
    return result, mem.peak


def max_delta(a, b) -> float:
    from layertrack.workers.vocabulary import BASE_METRICS

    return max(abs(x - y) for m in BASE_METRICS
               for x, y in zip(a.scores.metric(m), b.scores.metric(m), strict=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="measure on the CPU with a tiny model (no CUDA needed)")
    p.add_argument("--device", default=None, help="CUDA device (default cuda:0)")
    p.add_argument("--hidden", type=int, default=None, help="model width (default 2048; --cpu 256)")
    p.add_argument("--layers", type=int, default=None, help="blocks (default 16; --cpu 8)")
    p.add_argument("--tokens", type=int, default=None, help="probe tokens (default 32768; --cpu 4096)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; --cpu 256)")
    p.add_argument("--threads", type=int, default=1, help="--cpu: torch threads (default 1; 0: torch's own)")
    p.add_argument("--dir", default=None, help="where the checkpoint is built (default: a temporary directory)")
    args = p.parse_args()

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is available (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda or 'none'}); nothing measured. Run it on a CUDA host, or with --cpu to run "
              "the same measurements on the CPU with a tiny model.")
        return 0

    from layertrack.workers.engine import EngineConfig
    from layertrack.workers.scoring import ScoreConfig, prepare

    t_start = time.perf_counter()
    if args.cpu:
        if args.threads:
            torch.set_num_threads(args.threads)
        device, shape = torch.device("cpu"), dict(CPU_SHAPE)
        tokens_n, seq_len, save_dtype = args.tokens or 4096, args.seq_len or 256, "float32"
    else:
        device, shape = torch.device(args.device or "cuda:0"), dict(CUDA_SHAPE)
        tokens_n, seq_len, save_dtype = args.tokens or 32768, args.seq_len or 512, "bfloat16"
    if args.hidden:
        shape.update(hidden=args.hidden, intermediate=(args.hidden * 11 // 4 + 63) // 64 * 64,
                     heads=max(1, args.hidden // 128), kv_heads=max(1, args.hidden // 256))
    if args.layers:
        shape["layers"] = args.layers
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="layertrack-gpu-check-"))
    try:
        ckpt = build(root / "llama-random", shape, dtype=save_dtype, device=str(device))
        base = dict(max_tokens=tokens_n, seq_len=seq_len, device=str(device))
        prep = prepare(str(ckpt), config=ScoreConfig(**base))
        dtype = prep.dtype
        n_params = sum(sum(_numel(t["shape"]) for n, t in h.items() if n != "__metadata__")
                       for h, _ in prep.headers.values())
        log("warm-up ...")
        job(ckpt, ScoreConfig(**{**base, "max_tokens": min(tokens_n, 2 * seq_len)}), device)
        log("bare forward ...")
        fwd = bare_forward(ckpt, device=device, dtype=dtype, tokens=prep.tokens)
        n_tok = prep.tokens.n_tokens
        runs = {}
        for name, cfg in (
            ("resident, float64 statistics", ScoreConfig(**base, execution="resident")),
            ("resident, float32 GEMMs", ScoreConfig(**base, execution="resident",
                                                     engine=EngineConfig(gemm_precision="float32"))),
            ("streamed, float64 statistics", ScoreConfig(**base, execution="streamed")),
        ):
            log(f"{name} ...")
            runs[name] = job(ckpt, cfg, device)

        # ------------------------------------------------------------ report
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            where = (f"{props.name} ({device}, compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.1f} GiB); torch {torch.__version__}, CUDA {torch.version.cuda}")
        else:
            where = f"CPU, {torch.get_num_threads()} torch thread(s); torch {torch.__version__}"
        print(f"device: {where}")
        print(f"model: random-init Llama d={shape['hidden']}, {shape['layers']} blocks, MLP {shape['intermediate']}, "
              f"{shape['heads']} heads / {shape['kv_heads']} KV heads, {n_params / 1e6:.1f} M parameters, "
              f"run in {str(dtype).removeprefix('torch.')}")
        print(f"probe: {n_tok} tokens in sequences of {seq_len}, {prep.plan.batch_sequences} sequences per batch")
        print(f"forward pass (base model, no hooks): {n_tok / fwd:,.0f} tokens/s ({fwd:.2f} s for {n_tok} tokens, "
              "best of 3)")
        print()
        mem_name = "peak device MiB" if device.type == "cuda" else "peak RSS MiB"
        print(f"{'job':<30}{'plan':>17}{'load s':>8}{'score s':>9}{'stats share':>13}{mem_name:>17}"
              f"{'predicted':>11}{'max |Δ|':>10}")
        ref = runs["resident, float64 statistics"][0]
        for name, (r, peak) in runs.items():
            plan = r.plan
            mode = f"{plan['mode']}, {r.n_passes} pass" + ("es" if r.n_passes != 1 else "")
            share = max(0.0, 1 - fwd / r.timings["score_s"])
            predicted = plan["peak_bytes"] + plan["stats_bytes"]
            delta = "" if r is ref else (lambda d: "0" if d == 0 else f"{d:.1e}")(max_delta(r, ref))
            print(f"{name:<30}{mode:>17}{r.timings['load_s']:>8.2f}{r.timings['score_s']:>9.2f}{share:>12.1%} "
                  f"{peak / MIB:>16,.0f}{predicted / MIB:>11,.0f}{delta:>10}")
        streamed = runs["streamed, float64 statistics"][0]
        f32 = runs["resident, float32 GEMMs"][0]
        print()
        print(f"statistics share of the scoring time: float64 {max(0.0, 1 - fwd / ref.timings['score_s']):.1%}, "
              f"float32 GEMMs {max(0.0, 1 - fwd / f32.timings['score_s']):.1%} "
              f"(float32 / float64 score time {f32.timings['score_s'] / ref.timings['score_s']:.2f})")
        print(f"streamed / resident time (score_checkpoint, total_s): "
              f"{streamed.timings['total_s'] / ref.timings['total_s']:.2f} "
              f"({streamed.timings['total_s']:.2f} s / {ref.timings['total_s']:.2f} s); "
              f"max |Δscore| {max_delta(streamed, ref):.1e}")
        print(f"gpu_check wall time {time.perf_counter() - t_start:.0f} s")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    sys.exit(main())
