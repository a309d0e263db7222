"""Streamed vs resident execution of a ~1 GB checkpoint: wall time, peak memory, scores.

    python bench/streaming_bench.py                       # 6 to 8 min on 2 busy cores
    python bench/streaming_bench.py --dir /tmp/lt-stream  # keep the checkpoint for the next run
    python bench/streaming_bench.py --quick               # a ~200 MB model, 4096 tokens of 256: ~2 min
    python bench/streaming_bench.py --mmap-threshold 65536   # glibc returns freed tensors (below)

The checkpoint is a random-init Llama (d=768, 32 blocks, MLP 2688, 12 heads, 4 KV heads,
vocabulary 384: the byte-level BPE of tests/tiny_models.train_tokenizer; 249 M parameters,
float32, one safetensors file of ~1 GB) with its tokenizer, built once in ``--dir``. Then
each run is ``score_checkpoint`` in a process of its own, float32 on the CPU, the same
``--tokens`` probe tokens in sequences of ``--seq-len``, ``--batch-size`` sequences per
forward batch in every run:

  resident     ``execution="resident"``: every weight loaded (transformers) for the whole job
  streamed ¼   ``execution="streamed"``, ``max_memory`` = ¼ of the checkpoint's weight bytes
  streamed ⅛   the same with ⅛ (``--fractions`` changes the list)

Printed per run:

  wall s       wall time of ``score_checkpoint`` (loading, the forward passes, the statistics;
               ``--reps`` > 1: the smallest of the rounds, which run in rotated order)
  plan         the plan's mode and passes over the probe (``ScoreResult.plan``)
  pred. peak   the plan's predicted peak of weights and activations (``peak_bytes``)
  stats        the plan's statistics bytes (float64 statistics and fold buffers, ``stats_bytes``)
  measured     peak RSS above the process's RSS right before ``score_checkpoint`` (VmHWM reset
               to the current RSS through /proc/self/clear_refs, read from /proc/self/status).
               RSS counts what the allocator holds, including memory freed to it and not yet
               returned to the system
  bound        streamed: (``max_memory`` + stats) · 1.15, the promise of the memory plan with
               15 % for the interpreter, allocator and tokenizer; resident (no budget is set):
               (pred. peak + stats) · 1.15, the plan's own prediction with the same margin
  ok           measured ≤ bound
  / resident   wall time over the resident run's (target ≤ 1.25)
  max |Δ|      the largest |score difference| vs the resident run over every base metric of
               every layer (target: 0, identical)

Each run uses ``--threads`` torch threads (default 1): on 2 cores shared with other work, 2
OpenMP threads spend most of their time waiting for each other (measured here: the same job
took 133 s with 2 threads and 23 s with 1 while other processes kept the cores busy).

Before its measured job each process runs a warm-up job on a tiny checkpoint in the same
mode (imports, kernels and the tokenizer's code paths are then loaded before the baseline)
and the parent reads the weight files once before each run, so each run starts from a warm
page cache (streamed reads use ``pread`` into private memory: the page cache is not in
RSS; the resident loader's pages are, as far as it keeps them mapped). At the default batch
of 1 sequence of 512, the plan predicts one batch's activations at ~50 MB; at the job's CPU
default of 2 sequences (~100 MB) they alone would nearly fill ⅛ of 1 GB and that plan does
not fit.

``--mmap-threshold N`` runs the jobs with glibc's ``MALLOC_MMAP_THRESHOLD_=N``: allocations
of N bytes or more (every weight and hidden-state tensor at 65536) are then mapped on their
own and unmapped when freed, instead of coming from the heap, where freed memory stays
resident (glibc raises its threshold to the size of each large block it frees, up to 32
MiB). Without it — measured before workers/streaming.py read blocks into reused staging
buffers and trimmed the heap after each block — a streamed job's RSS could end well above what
it held, from run to run
(measured at ⅛: 776 to 797 MiB in 3 runs of 4, 479 MiB in the other, for 432 MiB
predicted); at 65536 it was 412 MiB in 3 runs of 3, but every fresh tensor then costs page
faults (6 to 8 million, some 20 s of system time, ~25 % of the job's wall time here).

The remote case (a checkpoint scored while it is fetched from S3, against the fetch and the
scoring measured apart) is bench/overlap_bench.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny_models

from score_vs_reference import rss_kib  # bench/ is on the path when run as a script

FULL = dict(hidden=768, intermediate=2688, layers=32, heads=12, kv_heads=4, vocab=384)
QUICK = dict(hidden=384, intermediate=1024, layers=32, heads=6, kv_heads=2, vocab=384)
MIB = 1 << 20
FRACTION_NAMES = {2: "½", 3: "⅓", 4: "¼", 8: "⅛", 16: "1/16"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the checkpoints
def build(directory: Path, shape: dict, *, seq_len: int) -> Path:
    """The benchmark checkpoint (random-init Llama of ``shape`` with the tiny models' tokenizer),
    unless ``directory`` already holds one of that shape."""
    marker = directory / "bench-shape.json"
    want = json.dumps(shape, sort_keys=True)
    if marker.is_file() and marker.read_text() == want and (directory / "tokenizer.json").is_file():
        return directory
    import torch
    from tiny_models import train_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    log(f"building the benchmark model in {directory} ...")
    if directory.exists():
        shutil.rmtree(directory)
    tok = train_tokenizer(shape["vocab"])
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                      max_position_embeddings=max(1024, seq_len), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(directory, max_shard_size="20GB")  # one file
    tok.save_pretrained(directory)
    marker.write_text(want)
    del model
    gc.collect()
    return directory


def build_tiny(directory: Path) -> Path:
    """The warm-up checkpoint (tests/tiny_models' llama)."""
    if (directory / "tokenizer.json").is_file():
        return directory
    from tiny_models import build_checkpoint, train_tokenizer

    return build_checkpoint(directory, "llama", train_tokenizer())


def weight_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def weight_bytes(ckpt: Path) -> tuple[int, int]:
    """(bytes of every tensor of the checkpoint, parameters), from the safetensors headers."""
    from layertrack.workers.streaming import read_header

    total = params = 0
    for f in weight_files(ckpt):
        header, _ = read_header(f)
        for name, t in header.items():
            if name != "__metadata__":
                b, e = t["data_offsets"]
                total += e - b
                n = 1
                for s in t["shape"]:
                    n *= s
                params += n
    return total, params


def warm_page_cache(ckpt: Path) -> None:
    for f in weight_files(ckpt):
        with open(f, "rb") as fh:
            while fh.read(64 * MIB):
                pass


# ---------------------------------------------------------------- one run per process
def reset_peak() -> bool:
    """VmHWM := VmRSS (False when the kernel does not allow it: the peak is then since start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(spec: dict) -> dict:
    import torch
    from layertrack.workers.scoring import ScoreConfig, score_checkpoint
    from layertrack.workers.vocabulary import BASE_METRICS

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    common = dict(seq_len=spec["seq_len"], batch_size=spec["batch_size"], device="cpu", dtype="float32")
    execution = spec["execution"]
    # warm-up on the tiny checkpoint, in the same mode (imports, kernels, tokenizer code paths)
    score_checkpoint(spec["tiny"], config=ScoreConfig(max_tokens=512, **{**common, "seq_len": 64},
                                                      execution=execution))
    config = ScoreConfig(max_tokens=spec["tokens"], execution=execution, max_memory=spec["max_memory"], **common)
    gc.collect()
    base = rss_kib("VmRSS")
    reset = reset_peak()
    t0 = time.perf_counter()
    result = score_checkpoint(spec["ckpt"], config=config)
    wall = time.perf_counter() - t0
    peak = rss_kib("VmHWM")
    return {
        "wall_s": wall,
        "timings": result.timings,
        "plan": result.plan,
        "n_passes": result.n_passes,
        "n_tokens": result.scores.n_tokens,
        "baseline_mib": base / 1024,
        "peak_above_mib": (peak - base) / 1024,
        "peak_reset": reset,
        "threads": torch.get_num_threads(),
        "warnings": result.scores.warnings,
        "scores": {m: result.scores.metric(m) for m in BASE_METRICS},
    }


def run_child(spec: dict, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        tail = proc.stderr[-3000:]
        if "PlanDoesNotFit" in tail:
            return {"error": tail.strip().splitlines()[-1]}
        raise SystemExit(f"run {spec['execution']} max_memory={spec['max_memory']} failed:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main
def fmt_mib(b: float) -> str:
    return f"{b / MIB:,.0f}"


def max_delta(a: dict, b: dict) -> float:
    return max(abs(x - y) for m in a for x, y in zip(a[m], b[m], strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where the checkpoints are built and kept (default: a new "
                   "temporary directory, removed at the end)")
    p.add_argument("--quick", action="store_true", help="a ~200 MB model (d=384, 32 blocks), 4096 tokens of 256")
    p.add_argument("--tokens", type=int, default=None, help="probe tokens (default 8192; --quick 4096)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; --quick 256)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward batch, in every run (default 1)")
    p.add_argument("--fractions", default="4,8", help="streamed runs: max_memory = weight bytes / each (default 4,8)")
    p.add_argument("--reps", type=int, default=1, help="rounds of all runs (default 1); the smallest wall is shown")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1; 0: torch's own)")
    p.add_argument("--mmap-threshold", type=int, default=None, help="glibc's MALLOC_MMAP_THRESHOLD_ for the runs "
                   "(bytes; default: glibc's dynamic threshold)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    shape = QUICK if args.quick else FULL
    tokens = args.tokens or (4096 if args.quick else 8192)
    seq_len = args.seq_len or (256 if args.quick else 512)
    fractions = [int(f) for f in args.fractions.split(",") if f]
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="layertrack-streaming-"))
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        ckpt = build(root / ("llama-quick" if args.quick else "llama-250m"), shape, seq_len=seq_len)
        tiny = build_tiny(root / "tiny")
        total, params = weight_bytes(ckpt)
        runs = [("resident", "resident", None)] + [
            (f"streamed {FRACTION_NAMES.get(f, f'1/{f}')}", "streamed", total // f) for f in fractions]
        child_env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}
        rounds: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
        for rep in range(args.reps):
            order = runs[rep % len(runs):] + runs[:rep % len(runs)]
            for name, execution, budget in order:
                log(f"  round {rep + 1}/{args.reps}: {name} ...")
                warm_page_cache(ckpt)
                rounds[name].append(run_child({
                    "ckpt": str(ckpt), "tiny": str(tiny), "execution": execution, "max_memory": budget,
                    "tokens": tokens, "seq_len": seq_len, "batch_size": args.batch_size, "threads": args.threads},
                    env=child_env))
        # per run, the round with the smallest wall time (a plan that does not fit fails every round)
        results = {name: min(rs, key=lambda r: r.get("wall_s", float("inf"))) for name, rs in rounds.items()}

        # ------------------------------------------------------------ the table
        ref = results["resident"]
        cmd = "python bench/streaming_bench.py " + " ".join(sys.argv[1:])
        print(f"command: {cmd.strip()}")
        print(f"model: random-init Llama d={shape['hidden']}, {shape['layers']} blocks, MLP {shape['intermediate']}, "
              f"{shape['heads']} heads / {shape['kv_heads']} KV heads, vocabulary {shape['vocab']}; "
              f"{params / 1e6:.1f} M parameters, {total / MIB:,.0f} MiB float32 in "
              f"{len(weight_files(ckpt))} safetensors file(s)")
        print(f"probe: {ref['n_tokens']} tokens in sequences of {seq_len}, {args.batch_size} sequence(s) per batch; "
              f"CPU, float32, {ref['threads']} torch thread(s); {args.reps} round(s)"
              + (f"; MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else "")
              + (", smallest wall time shown" if args.reps > 1 else ""))
        print()
        print(f"{'run':<13}{'budget':>8}{'wall s':>8}  {'plan':<20}{'pred. peak':>10}{'stats':>7}{'measured':>10}"
              f"{'bound':>7}{'ok':>4}{'/ resident':>11}{'max |Δ|':>9}")
        print(f"{'':<13}{'MiB':>8}{'':>8}  {'':<20}{'MiB':>10}{'MiB':>7}{'MiB':>10}{'MiB':>7}")
        verdicts = []
        for name, _execution, budget in runs:
            r = results[name]
            if "error" in r:
                print(f"{name:<13}{fmt_mib(budget) if budget else '-':>8}  does not fit: {r['error']}")
                verdicts.append(f"{name}: the plan does not fit")
                continue
            plan = r["plan"]
            stats = plan["stats_bytes"]
            bound = ((budget if budget else plan["peak_bytes"]) + stats) * 1.15
            measured = r["peak_above_mib"] * MIB
            ok = measured <= bound
            ratio = r["wall_s"] / ref["wall_s"]
            delta = max_delta(r["scores"], ref["scores"])
            mode = f"{plan['mode']}, {r['n_passes']} pass" + ("es" if r["n_passes"] != 1 else "")
            print(f"{name:<13}{fmt_mib(budget) if budget else '-':>8}{r['wall_s']:>8.1f}  {mode:<20}"
                  f"{fmt_mib(plan['peak_bytes']):>10}{fmt_mib(stats):>7}{r['peak_above_mib']:>10,.0f}"
                  f"{bound / MIB:>7,.0f}{'yes' if ok else 'NO':>4}{ratio:>11.3f}"
                  f"{('0' if delta == 0 else f'{delta:.1e}'):>9}")
            if not ok:
                verdicts.append(f"{name}: measured peak {r['peak_above_mib']:,.0f} MiB exceeds the bound "
                                f"{bound / MIB:,.0f} MiB")
            if name != "resident":
                if ratio > 1.25:
                    verdicts.append(f"{name}: {ratio:.2f}x the resident time (target <= 1.25)")
                if delta != 0:
                    verdicts.append(f"{name}: scores differ from resident by up to {delta:.1e}")
            if not r["peak_reset"]:
                verdicts.append(f"{name}: VmHWM could not be reset: its peak counts from the process start")
        print()
        print("time split (load_s / score_s of ScoreResult.timings), s:  " + ";  ".join(
            f"{name} {results[name]['timings']['load_s']:.1f} / {results[name]['timings']['score_s']:.1f}"
            for name, _, _ in runs if "timings" in results[name]))
        if args.reps > 1:
            print("wall s of every round:  " + ";  ".join(
                f"{name} " + " ".join(f"{r['wall_s']:.1f}" for r in rounds[name] if "wall_s" in r)
                for name, _, _ in runs))
        print(f"targets: {'all met' if not verdicts else 'NOT met: ' + '; '.join(verdicts)}")
        load = os.getloadavg()
        print(f"bench wall time {time.perf_counter() - t_start:.0f} s; load average at the end "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
