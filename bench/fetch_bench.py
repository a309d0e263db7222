"""Fetching a ~500 MB sharded checkpoint from S3, and a remote job end to end.

    python bench/fetch_bench.py                    # ~6 min on 2 cores; needs nothing running
    python bench/fetch_bench.py --reps 3 --e2e-reps 1 --tokens 2048     # a quick look

The checkpoint is a random-init Llama (d=768, 14 blocks, ~122 M parameters, float32, 487 MB =
464 MiB) saved with ``max_shard_size="100MB"`` (6 safetensors shards + index + config and
tokenizer files, 11 files), uploaded with one PUT per file to moto's S3 server (``python -m
moto.server``, a process of its own, threaded) on 127.0.0.1 (tests/moto_s3.py's MotoProcess,
upload_dir and CREDENTIALS). Then:

1. Fetch, ``--reps`` rounds (default 5; the order of the methods rotates each round; each
   round starts from nothing on the local disk); the median, min and max wall time of:

   layertrack            the worker's path: list, ``checkpoint_files``, ``Cache.fetch`` into a
                         fresh cache (8 files at once, 16 MiB range requests, each file
                         verified against its ETag's MD5 and fsync'ed before the rename)
   layertrack, no MD5    the same with LAYERTRACK_S3_ETAG_MD5=0 (no checksum verified)
   boto3 download_file   the baseline: list_objects_v2, then ``s3.download_file`` per object,
                         one object after the other, boto3's default TransferConfig (8 MiB
                         parts, 10 threads per object)
   boto3, 8 objects at once   the same calls from 8 threads

2. End to end, ``--e2e-reps`` rounds: an embedded service (service/embedded.py: API + one
   worker, SQLite and the filesystem broker, as ``layertrack up`` runs, worker pinned to one
   thread per process as EmbeddedService does) scores the checkpoint from its s3:// URI
   (worker cache emptied before each) and from its local directory; each the time from
   submission to the job's scores (``succeeded``), with ``--tokens`` probe tokens. Compared
   with (median fetch by layertrack) + (local job).

moto answers every GET, ranged or not, by reading (and copying) the whole object from its
temporary file under a per-object lock, and slicing the range out of it: a 16 MiB range of a
100 MB shard costs the server the whole 100 MB, and the reads of one object are serialized.
moto is Python, on the same 2 cores as the clients. The figures measure moto as much as the
clients; against a real S3 the concurrent range requests run side by side. Run it on an
otherwise idle machine; the load average printed at the end says how idle it was.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # moto_s3: the tests' moto helpers

from moto_s3 import MotoProcess, upload_dir

BUCKET = "bench"
PREFIX = "ckpts/llama-121m/step-1000"
SHAPE = dict(hidden=768, layers=14, heads=12, kv_heads=4, intermediate=3072, vocab=384)
MIB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the checkpoint and the store
def build_model(directory: Path, tokenizer, *, shape: dict, shard: str | None, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"], max_position_embeddings=1024,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- the fetch methods
def fetch_layertrack(uri: str, dest: Path, *, md5: bool) -> int:
    from layertrack.workers import fetch, locations, stores

    os.environ["LAYERTRACK_S3_ETAG_MD5"] = "1" if md5 else "0"
    store = stores.open_store(locations.parse(uri))
    files = stores.checkpoint_files(store.list(), store)
    cache = fetch.Cache(dest, 50 << 30)
    path = cache.fetch(store, files)
    n = sum(p.stat().st_size for p in Path(path).iterdir())
    cache.release(path)
    return n


def fetch_boto3(s3, dest: Path, *, threads: int = 1) -> int:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX + "/"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    dest.mkdir(parents=True, exist_ok=True)

    def one(key: str) -> int:
        target = dest / key.rsplit("/", 1)[1]
        s3.download_file(BUCKET, key, str(target))
        return target.stat().st_size

    if threads == 1:
        return sum(one(k) for k in keys)
    with ThreadPoolExecutor(threads) as ex:
        return sum(ex.map(one, keys))


# ---------------------------------------------------------------- end to end
def wait_done(c, job_id: str, timeout: float = 1800) -> dict:
    job = c.wait(job_id, timeout=timeout, poll=0.1)
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job_id} ended {job['status']}: {job.get('error_code')}: {job.get('error')}")
    return job


def timed_job(c, **fields) -> tuple[float, dict]:
    t0 = time.perf_counter()
    job = c.submit(**fields)
    done = wait_done(c, job["id"])
    return time.perf_counter() - t0, done


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.2f} {min(xs):8.2f} {max(xs):8.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="fetch rounds (default 5)")
    p.add_argument("--e2e-reps", type=int, default=3, help="end-to-end rounds (default 3; 0: skip)")
    p.add_argument("--tokens", type=int, default=4096, help="probe tokens the jobs score (default 4096)")
    p.add_argument("--shard", default="100MB", help="max_shard_size of the checkpoint (default 100MB)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a new temporary one, removed)")
    args = p.parse_args()

    cmd = "python bench/fetch_bench.py " + " ".join(sys.argv[1:])
    own_workdir = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lt-fetch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        moto = MotoProcess(timeout=60, new_session=True)
    except RuntimeError as e:
        raise SystemExit(f"{e} (pip install 'moto[server]')") from None
    os.environ.update(moto.env())
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    try:
        run(args, cmd, work, moto)
    finally:
        moto.close()
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)


def run(args, cmd: str, work: Path, moto: MotoProcess) -> None:
    from layertrack.service.demo import train_tokenizer
    from layertrack.workers.probe import default_probe

    tokenizer = train_tokenizer(list(default_probe().documents[:40]), SHAPE["vocab"])
    t0 = time.perf_counter()
    ckpt = build_model(work / "ckpts" / "llama-121m", tokenizer, shape=SHAPE, shard=args.shard)
    files = sorted(f for f in ckpt.iterdir() if f.is_file())
    total = sum(f.stat().st_size for f in files)
    shards = [f for f in files if f.suffix == ".safetensors"]
    log(f"built {ckpt.name}: {len(files)} files, {total / MIB:.1f} MiB, {len(shards)} shards "
        f"({time.perf_counter() - t0:.1f} s)")
    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    t0 = time.perf_counter()
    upload_dir(s3, BUCKET, PREFIX, ckpt)
    log(f"uploaded to {moto.url}/{BUCKET}/{PREFIX} ({time.perf_counter() - t0:.1f} s)")
    uri = f"s3://{BUCKET}/{PREFIX}"

    # ---------------------------------------------------------------- 1. fetch
    methods = {
        "layertrack Cache.fetch": lambda d: fetch_layertrack(uri, d, md5=True),
        "layertrack, no MD5 check": lambda d: fetch_layertrack(uri, d, md5=False),
        "boto3 download_file": lambda d: fetch_boto3(s3, d),
        "boto3, 8 objects at once": lambda d: fetch_boto3(s3, d, threads=8),
    }
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            dest = work / "fetched"
            shutil.rmtree(dest, ignore_errors=True)
            subprocess.run(["sync"], check=False)
            t0 = time.perf_counter()
            n = methods[name](dest)
            dt = time.perf_counter() - t0
            if n != total:
                raise SystemExit(f"{name} fetched {n} bytes, not {total}")
            times[name].append(dt)
            log(f"round {r + 1}/{args.reps}: {name}: {dt:.2f} s ({total / MIB / dt:.1f} MiB/s)")
            shutil.rmtree(dest, ignore_errors=True)
    os.environ.pop("LAYERTRACK_S3_ETAG_MD5", None)

    # ---------------------------------------------------------------- 2. end to end
    e2e: dict[str, list[float]] = {"remote": [], "local": [], "fetch_in_job": []}
    if args.e2e_reps:
        from layertrack.service.embedded import EmbeddedService

        cache_dir = work / "worker-cache"
        env = {**moto.env(), "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
               "LAYERTRACK_CHECKPOINT_ROOTS": f"{work / 'ckpts'},s3://{BUCKET}/ckpts/",
               "LAYERTRACK_CACHE_DIR": str(cache_dir), "LAYERTRACK_PROGRESS_INTERVAL_S": "1"}
        cfg = {"max_tokens": args.tokens, "seq_len": 512}
        with EmbeddedService(data_dir=work / "svc", roots=[work / "ckpts"], env=env) as svc:
            svc.migrate_and_token()
            svc.start_api()
            svc.start_worker("bench")
            warm = build_model(work / "ckpts" / "warm-up", tokenizer, shape={**SHAPE, "hidden": 64, "layers": 2,
                                                                             "heads": 4, "kv_heads": 2,
                                                                             "intermediate": 128}, shard=None)
            with svc.client() as c:
                t0 = time.perf_counter()
                wait_done(c, c.submit(run="warm-up", step=0, uri=str(warm), config={"max_tokens": 512})["id"])
                log(f"worker up and warm ({time.perf_counter() - t0:.1f} s)")
                for r in range(args.e2e_reps):
                    for kind in (("remote", "local") if r % 2 == 0 else ("local", "remote")):
                        if kind == "remote":
                            shutil.rmtree(cache_dir / "objects", ignore_errors=True)
                            dt, job = timed_job(c, run=f"bench-remote-{r}", step=1000, uri=uri, config=cfg)
                            fetch_s = job["progress"]["fetch_s"]
                            e2e["fetch_in_job"].append(fetch_s)
                            assert job["progress"]["bytes_fetched"] == job["progress"]["bytes_total"], job["progress"]
                            log(f"e2e round {r + 1}/{args.e2e_reps}: remote job {dt:.2f} s (its fetch {fetch_s:.2f} s)")
                        else:
                            dt, job = timed_job(c, run=f"bench-local-{r}", step=1000, uri=str(ckpt), config=cfg)
                            log(f"e2e round {r + 1}/{args.e2e_reps}: local job {dt:.2f} s")
                        e2e[kind].append(dt)

    # ---------------------------------------------------------------- the figures
    base = statistics.median(times["boto3 download_file"])
    print()
    print(f"command: {cmd}")
    print(f"checkpoint: random-init Llama d={SHAPE['hidden']}, {SHAPE['layers']} blocks, float32, {len(files)} files "
          f"({len(shards)} safetensors shards of <= {args.shard}), {total / MIB:.1f} MiB, on moto's S3 server "
          f"(python -m moto.server) on 127.0.0.1; {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    print()
    print(f"fetch, {args.reps} rounds (method order rotated), seconds:")
    print(f"{'method':<28}{'median':>8} {'min':>8} {'max':>8}  {'MiB/s':>7}  {'vs boto3':>8}")
    for n in names:
        med = statistics.median(times[n])
        print(f"{n:<28}{fmt(times[n])}  {total / MIB / med:7.1f}  {base / med:7.2f}x")
    if args.e2e_reps:
        fetch_med = statistics.median(times["layertrack Cache.fetch"])
        remote, local = statistics.median(e2e["remote"]), statistics.median(e2e["local"])
        print()
        print(f"end to end (embedded service, SQLite + filesystem broker, 1 worker; {args.tokens} probe tokens), "
              f"{args.e2e_reps} rounds, seconds from submission to scores:")
        print(f"{'what':<46}{'median':>8} {'min':>8} {'max':>8}")
        print(f"{'remote job (s3:// URI, empty worker cache)':<46}{fmt(e2e['remote'])}")
        print(f"{'  of which its fetch (job progress fetch_s)':<46}{fmt(e2e['fetch_in_job'])}")
        print(f"{'local job (the same checkpoint, local path)':<46}{fmt(e2e['local'])}")
        print(f"{'fetch (layertrack, median above) + local job':<46}{fetch_med + local:8.2f}")
        print(f"remote job / (fetch + local job) = {remote / (fetch_med + local):.3f}; "
              f"remote - (fetch + local) = {remote - fetch_med - local:+.2f} s")


if __name__ == "__main__":
    threading.current_thread().name = "fetch-bench"
    main()
