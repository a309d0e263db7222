"""A remote checkpoint scored while it is fetched, against the fetch and the scoring apart.

    python bench/overlap_bench.py                 # ~5 min on 2 cores; needs nothing running
    python bench/overlap_bench.py --reps 1 --tokens 2048       # a quick look

The checkpoint is bench/fetch_bench.py's: a random-init Llama (d=768, 14 blocks, ~122 M
parameters, float32, 464 MiB) in 100 MB safetensors shards, uploaded to moto's S3 server
(``python -m moto.server``, a process of its own) on 127.0.0.1. Each round, in this
process, the worker's own functions, with ``--tokens`` probe tokens:

  fetch alone      ``Cache.fetch`` of every file into an empty cache (what a job waited for
                   before it could score)
  scoring alone    ``score_checkpoint`` of a local copy (its default plan: resident here)
  remote job       ``workers.remote.fetch_and_score`` into an empty cache: headers first,
                   weight files in block order, each block as soon as its file is in

Printed: the median over ``--reps`` rounds of each, and the remote job's time over
max(fetch alone, scoring alone) (target ≤ 1.15) and over their sum. moto reads the whole
object for every ranged GET and runs on the same 2 cores as the scoring; see
bench/fetch_bench.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fetch_bench
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # moto_s3

from fetch_bench import BUCKET, PREFIX, SHAPE, build_model
from moto_s3 import MotoProcess, upload_dir

MIB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="rounds (default 3; the order of the three rotates)")
    p.add_argument("--tokens", type=int, default=4096, help="probe tokens (default 4096)")
    p.add_argument("--shard", default="100MB", help="max_shard_size of the checkpoint (default 100MB)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on 2 cores the other one "
                   "serves moto and the fetch)")
    args = p.parse_args()
    cmd = "python bench/overlap_bench.py " + " ".join(sys.argv[1:])

    import torch

    torch.set_num_threads(args.threads)
    from layertrack.service.demo import train_tokenizer
    from layertrack.workers import fetch, locations, remote, stores
    from layertrack.workers.probe import default_probe
    from layertrack.workers.scoring import ScoreConfig, score_checkpoint

    work = Path(tempfile.mkdtemp(prefix="lt-overlap-bench-"))
    moto = MotoProcess(timeout=60, new_session=True)
    os.environ.update(moto.env())
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    try:
        tokenizer = train_tokenizer(list(default_probe().documents[:40]), SHAPE["vocab"])
        ckpt = build_model(work / "ckpts" / "llama-121m", tokenizer, shape=SHAPE, shard=args.shard)
        s3 = moto.client()
        s3.create_bucket(Bucket=BUCKET)
        upload_dir(s3, BUCKET, PREFIX, ckpt)
        uri = f"s3://{BUCKET}/{PREFIX}"
        store = stores.open_store(locations.parse(uri))
        files = stores.checkpoint_files(store.list(), store)
        total = sum(f.size for f in files)
        n_shards = sum(f.key.endswith(".safetensors") for f in files)
        config = ScoreConfig(max_tokens=args.tokens, seq_len=512)
        score_checkpoint(str(ckpt), config=ScoreConfig(max_tokens=2048, seq_len=512))  # warm-up

        def fetch_alone() -> float:
            shutil.rmtree(work / "cache", ignore_errors=True)
            cache = fetch.Cache(work / "cache", 50 << 30)
            t = time.perf_counter()
            cache.release(cache.fetch(store, files))
            return time.perf_counter() - t

        def scoring_alone() -> float:
            t = time.perf_counter()
            score_checkpoint(str(ckpt), config=config)
            return time.perf_counter() - t

        def remote_job() -> float:
            shutil.rmtree(work / "cache", ignore_errors=True)
            cache = fetch.Cache(work / "cache", 50 << 30)
            t = time.perf_counter()
            out = remote.fetch_and_score(store, files, cache, config=config)
            dt = time.perf_counter() - t
            cache.release(out.checkout)
            log(f"    remote job: plan {out.result.plan['mode']}, fetch done after {out.fetch_s:.1f} s")
            return dt

        runs = {"fetch alone": fetch_alone, "scoring alone": scoring_alone, "remote job": remote_job}
        names = list(runs)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.reps):
            for name in names[r % 3:] + names[:r % 3]:
                dt = runs[name]()
                times[name].append(dt)
                log(f"  round {r + 1}: {name} {dt:.1f} s")
        med = {n: statistics.median(v) for n, v in times.items()}
        print(f"command: {cmd.strip()}")
        print(f"checkpoint: random-init Llama d={SHAPE['hidden']}, {SHAPE['layers']} blocks, {total / MIB:,.0f} MiB in "
              f"{n_shards} shards on moto's S3 (a process of its own); {args.tokens} probe tokens; CPU float32, "
              f"{args.threads} torch thread(s); median of {args.reps}")
        for n in names:
            print(f"  {n:<14} {med[n]:7.1f} s   (rounds: {', '.join(f'{t:.1f}' for t in times[n])})")
        bound = max(med["fetch alone"], med["scoring alone"])
        ratio = med["remote job"] / bound
        verdict = "met" if ratio <= 1.15 else "NOT met"
        total_time = med["fetch alone"] + med["scoring alone"]
        print(f"  remote job / max(fetch, scoring) = {ratio:.3f} (target <= 1.15: {verdict})")
        print(f"  remote job / (fetch + scoring)   = {med['remote job'] / total_time:.3f}")
        load = os.getloadavg()
        print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    finally:
        moto.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
