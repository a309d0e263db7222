"""Trend and series queries over ~6 M stored scores, and submission latency under load.

    python bench/api_bench.py            # needs PostgreSQL and Redis (as for the tests)

1. Creates a fresh PostgreSQL database, migrates it, and loads 10 runs × 2,000 steps ×
   32 layers × 9 metrics = 5,760,000 scores (COPY), with a checkpoint and a job per step.
   Then VACUUM ANALYZE and CHECKPOINT, so the figures are a steady database's.
2. Starts the API server (uvicorn, one process) on that database and a Redis broker.
3. Over HTTP, 50 times each on random runs: the layer-mean trend and one layer's series,
   both downsampled to 500 points. Prints median and p95 latency.
4. Submits checkpoints one after another (200 by default, after 100 concurrent ones that
   warm the connection pools) and prints the API time per submission: the API process's CPU
   time (user + system, from /proc) divided by the number of submissions, and the median
   round trip.
5. From a separate process, submits checkpoints at 100 requests/s for 10 s (open loop:
   each request leaves at its scheduled time, whatever the previous ones did) and prints
   p50/p99 latency and the error count.

    python bench/api_bench.py --only-submit   # 4 and 5 only, on an empty database (~40 s)

The nine stored metrics are what a job with dynamics stores (the engine's seven base
metrics, ``weight_update`` and ``drift_cka``): 5,760,000 scores; queries read ``linearity``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

RUNS, STEPS, LAYERS = 10, 2000, 32
#: what a job with dynamics stores: the engine's seven base metrics, weight_update and drift_cka
METRICS = ["linearity", "linearity_nores", "cosine", "norm_ratio", "anisotropy", "effective_rank",
           "massive_activation", "weight_update", "drift_cka"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(db_url: str) -> None:
    import psycopg
    from layertrack.service.db import session_scope
    from layertrack.service.submissions import probe_row
    from sqlalchemy.engine import make_url

    with session_scope(db_url) as s:
        probe_id = probe_row(s, "default").id
    u = make_url(db_url)
    conninfo = f"host={u.host} port={u.port or 5432} user={u.username} dbname={u.database}"
    rng = random.Random(0)
    t0 = time.perf_counter()
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
        for r in range(RUNS):
            cur.execute(
                "INSERT INTO runs (name, phase, metadata, created_at)"
                " VALUES (%s, 'pretrain', '{}', now()) RETURNING id",
                (f"bench-run-{r}",),
            )
            run_id = cur.fetchone()[0]
            with cur.copy("COPY checkpoints (run_id, step, phase, uri, fingerprint, created_at) FROM STDIN") as cp:
                for step in range(STEPS):
                    cp.write_row((run_id, step * 10, "pretrain", f"/ckpt/{r}/{step}", f"{step:064d}", "now"))
            cur.execute("SELECT id, step FROM checkpoints WHERE run_id = %s", (run_id,))
            ckpt_of = {step: cid for cid, step in cur.fetchall()}
            job_of = {}
            with cur.copy(
                "COPY jobs (id, checkpoint_id, probe_id, run_id, config, config_hash, status, attempts, queued_at)"
                " FROM STDIN"
            ) as cp:
                for step, cid in ckpt_of.items():
                    jid = str(uuid.uuid4())
                    job_of[step] = jid
                    cp.write_row((jid, cid, probe_id, run_id, "{}", "0" * 64, "succeeded", 1, "now"))
            with cur.copy("COPY scores (job_id, run_id, step, layer, metric, value, final_norm) FROM STDIN") as cp:
                for step in range(STEPS):
                    for m in METRICS:
                        base = rng.random()
                        for layer in range(LAYERS):
                            cp.write_row((job_of[step * 10], run_id, step * 10, layer, m,
                                          base + 0.01 * rng.random(), layer == LAYERS - 1))
            conn.commit()
            log(f"  loaded run {r + 1}/{RUNS} ({time.perf_counter() - t0:.0f} s)")
        cur.execute("SELECT count(*) FROM scores")
        log(f"  {cur.fetchone()[0]:,} scores in {time.perf_counter() - t0:.0f} s")
    # settle the bulk load (vacuum, statistics, flush the WAL) so that the figures below are
    # those of a steady database, not of the load's aftermath
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and of its live children (the uvicorn
    workers when there are several), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):  # no children file: the process alone
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def submit_sequential(h, pid: int, uri: str, n: int) -> dict:
    """``n`` submissions one after another (each a new step of a new run, after 100
    concurrent ones that warm the pools); the API process's CPU time per submission and the
    round trips' median and p99."""
    import concurrent.futures

    run = f"seq-{uuid.uuid4().hex[:6]}"
    with concurrent.futures.ThreadPoolExecutor(20) as pool:  # warm-up: pools at their steady size
        for r in pool.map(lambda i: h.post("/v1/checkpoints", json={"run": run + "-warm", "step": i, "uri": uri}),
                          range(100)):
            assert r.status_code == 202, r.text
    lat = []
    cpu0 = cpu_seconds(pid)
    for i in range(n):
        t = time.perf_counter()
        r = h.post("/v1/checkpoints", json={"run": run, "step": i, "uri": uri})
        lat.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 202, r.text
    cpu = cpu_seconds(pid) - cpu0
    return {"n": n, "cpu_ms": cpu * 1000 / n, "p50": statistics.median(lat), "p99": pct(lat, 99)}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


async def submit_load(url: str, token: str, uri: str, rate: float, seconds: float) -> dict:
    import httpx

    n = int(rate * seconds)
    lat: list[float] = []
    errors: dict[str, int] = {}
    run = f"load-{uuid.uuid4().hex[:6]}"
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=30, limits=limits) as client:
        async def one(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            t = time.perf_counter()
            try:
                r = await client.post("/v1/checkpoints", json={"run": run, "step": i, "uri": uri})
                if r.status_code != 202:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
            except Exception as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            lat.append((time.perf_counter() - t) * 1000)

        # warm up: concurrent requests open the server's database and broker connection
        # pools to the size a steady load keeps them at (a pool growing costs a connect)
        for wave in range(5):
            await asyncio.gather(*(client.post("/v1/checkpoints", json={"run": run + "-warm", "step": wave * 20 + i,
                                                                           "uri": uri}) for i in range(20)))
        start = time.perf_counter() + 0.2
        await asyncio.gather(*(one(i, start + i / rate) for i in range(n)))
        elapsed = time.perf_counter() - start
    return {"n": n, "p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat), "errors": errors,
            "achieved_rps": n / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--api-processes", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--only-submit", action="store_true", help="skip loading scores and the queries")
    p.add_argument("--sequential", type=int, default=200, help="submissions one after another (0: none)")
    p.add_argument("--load-child", nargs=3, metavar=("URL", "TOKEN", "URI"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.load_child:
        url, token, uri = args.load_child
        print(json.dumps(asyncio.run(submit_load(url, token, uri, args.rate, args.seconds))))
        return

    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import tempfile

    import numpy as np
    from safetensors.numpy import save_file
    from services import RedisServer, Service, create_pg_database, drop_pg_database

    tmp = Path(tempfile.mkdtemp(prefix="lt-api-bench-"))
    roots = tmp / "ckpts"
    ckpt = roots / "tiny"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({"w": np.zeros(1, np.float32)}, str(ckpt / "model.safetensors"))  # the API checks its header only
    redis = RedisServer().start()  # a private server on a free port
    db, broker = create_pg_database(), redis.new_url()
    svc = Service(tmp=tmp, db_url=db, broker_url=broker, roots=roots, extra_env={"LAYERTRACK_SWEEP_INTERVAL_S": "0"})
    try:
        svc.migrate_and_token()
        if not args.only_submit:
            log("loading scores into PostgreSQL ...")
            load(db)
        svc.start_api(processes=args.api_processes)
        log(f"API server: pid {svc.api.pid}")
        rng = random.Random(1)
        timings: dict[str, list[float]] = {"trend": [], "series": []}
        with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {svc.token}"}, timeout=30) as h:
            for _ in range(0 if args.only_submit else 5):  # warm-up
                h.get("/v1/runs/bench-run-0/trend", params={"metric": "linearity", "max_points": 500})
            for _ in range(0 if args.only_submit else args.queries):
                run = f"bench-run-{rng.randrange(RUNS)}"
                t = time.perf_counter()
                r = h.get(f"/v1/runs/{run}/trend", params={"metric": "linearity", "max_points": 500})
                timings["trend"].append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200 and len(r.json()["steps"]) <= 500, r.text
                t = time.perf_counter()
                r = h.get(f"/v1/runs/{run}/scores",
                          params={"metric": "linearity", "layer": rng.randrange(LAYERS), "max_points": 500})
                timings["series"].append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200 and len(r.json()["series"][0]["steps"]) <= 500, r.text
            seq = None
            if args.sequential:
                log(f"submitting {args.sequential} checkpoints one after another ...")
                seq = submit_sequential(h, svc.api.pid, str(ckpt), args.sequential)
        log(f"submitting at {args.rate:g} requests/s for {args.seconds:g} s from a separate process ...")
        out = subprocess.run(
            [sys.executable, __file__, "--rate", str(args.rate), "--seconds", str(args.seconds),
             "--load-child", svc.url, svc.token, str(ckpt)],
            capture_output=True, text=True, env=dict(os.environ),
        )
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        load_res = json.loads(out.stdout.strip().splitlines()[-1])
        n_scores = RUNS * STEPS * LAYERS * len(METRICS)
        stored = "no stored scores (--only-submit)" if args.only_submit else (
            f"{n_scores:,} scores ({RUNS} runs x {STEPS} steps x {LAYERS} layers x {len(METRICS)} metrics)")
        print(f"PostgreSQL, {stored}; API: uvicorn, {args.api_processes} process(es); over HTTP on loopback")
        for name, label in (("trend", "trend (layer mean per step)"), ("series", "one layer's series")):
            xs = timings[name]
            if not xs:
                continue
            print(f"{label:<30} downsampled to 500 points: median {statistics.median(xs):.1f} ms, "
                  f"p95 {pct(xs, 95):.1f} ms over {len(xs)} queries")
        if seq is not None:
            print(f"API time per submission, sequential: {seq['cpu_ms']:.2f} ms of API-process CPU "
                  f"({seq['n']} submissions one after another; round trip p50 {seq['p50']:.1f} ms, "
                  f"p99 {seq['p99']:.1f} ms)")
        print(f"p99 at {args.rate:g} rps: {load_res['p99']:.1f} ms")
        print(f"submission at {args.rate:g} req/s for {args.seconds:g} s ({load_res['n']} requests, "
              f"achieved {load_res['achieved_rps']:.1f} req/s): p50 {load_res['p50']:.1f} ms, "
              f"p99 {load_res['p99']:.1f} ms, max {load_res['max']:.1f} ms, errors {load_res['errors'] or 0}")
    finally:
        svc.stop()
        drop_pg_database(db)
        redis.close()


if __name__ == "__main__":
    main()
