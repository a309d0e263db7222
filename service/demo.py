"""``layertrack demo``: the paper's training dynamics, reproduced on this machine.

1. Pretrain a small Llama-shaped model from scratch on the docstrings of Python's standard
   library (present wherever Python is: nothing is downloaded), with the Trainer callback
   posting checkpoints at log-spaced steps.
2. Fine-tune the last checkpoint on a narrow task (two-digit additions written out in
   words and digits, generated here), as a separate run whose parent is the pretraining run.
3. Score the last checkpoint of each phase again with linear replaceability.
4. Print the trend table, write PNG plots and ``summary.json`` (with the Spearman
   correlation between the layers' linearity and their replaceability).

Against the service named by --url / LAYERTRACK_URL when it answers, else an embedded one
(``layertrack up`` in a subprocess, SQLite, data under the output directory). The service
must be able to read the output directory (its checkpoint roots).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: standard-library modules whose docstrings make the pretraining corpus
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox", "math",
    "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform",
    "plistlib", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)
METRICS = ("linearity", "linearity_nores")


@dataclass
class Plan:
    hidden: int
    layers: int
    heads: int
    seq_len: int
    batch: int
    pretrain_steps: int
    finetune_steps: int
    n_saves: int
    vocab: int
    lr: float
    score_config: dict[str, Any]
    holdout_tokens: int


PLANS = {
    # 5.7 min on a 2-core CPU, everything included (docs/REPRODUCTION.md)
    "default": Plan(hidden=128, layers=8, heads=4, seq_len=128, batch=8, pretrain_steps=1000, finetune_steps=250,
                    n_saves=10, vocab=2048, lr=3e-3, score_config={"max_tokens": 8192, "seq_len": 128},
                    holdout_tokens=4096),
    # a smoke test: seconds
    "short": Plan(hidden=32, layers=3, heads=4, seq_len=64, batch=4, pretrain_steps=8, finetune_steps=4,
                  n_saves=4, vocab=512, lr=3e-3, score_config={"max_tokens": 600, "seq_len": 64}, holdout_tokens=256),
}


# ------------------------------------------------------------------ data (offline)
def stdlib_docstrings() -> list[str]:
    """Docstrings of the modules above and their public classes and functions."""
    import importlib

    docs: list[str] = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a module this Python lacks: skip it
            continue
        seen = set()
        for obj in [mod, *(getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_"))]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj)
                                          or inspect.isfunction(obj) or inspect.isbuiltin(obj)) else None
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def in_words(n: int) -> str:
    if n < 20:
        return NUMBERS[n]
    if n < 100:
        return TENS[n // 10 - 2] + ("" if n % 10 == 0 else "-" + NUMBERS[n % 10])
    return in_words(n // 100) + " hundred" + ("" if n % 100 == 0 else " and " + in_words(n % 100))


def addition_task(n: int, seed: int) -> list[str]:
    """The narrow fine-tuning task: 'Q: what is forty-two plus seven? A: 42 + 7 = 49.'"""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        out.append(f"Q: what is {in_words(a)} plus {in_words(b)}? A: {a} + {b} = {a + b}.")
    return out


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def blocks_of(tokenizer, texts: list[str], seq_len: int) -> list[dict]:
    import torch

    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    out = []
    for i in range(len(stream) // seq_len):
        ids = torch.tensor(stream[i * seq_len:(i + 1) * seq_len])
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def log_spaced(total: int, n: int) -> list[int]:
    """About ``n`` steps from 1 to ``total``, evenly spaced in log(step); always ends at total."""
    if total <= n:
        return list(range(1, total + 1))
    steps = sorted({max(1, round(math.exp(i * math.log(total) / (n - 1)))) for i in range(n)} | {total})
    return steps


# ------------------------------------------------------------------ the service
@contextlib.contextmanager
def service(url: str | None, token: str | None, out: Path):
    """(url, token) of a service that answers: the one given, or an embedded one."""
    from .client import Client, ServiceUnavailable, discover

    if url is None:
        url, token_found = discover()
        token = token or token_found
        explicit = "LAYERTRACK_URL" in os.environ
    else:
        explicit = True
    if url and token:
        try:
            with Client(url, token, retries=0, timeout=5) as c:
                c.runs(name="--none--")
            yield url, token
            return
        except ServiceUnavailable:
            if explicit:
                raise SystemExit(f"error: layertrack at {url} cannot be reached; start it or leave out --url "
                                 "to use an embedded one") from None
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = out / "service"
    # one thread for the worker, the rest for training: two OpenMP pools on the same cores
    # slow each other down many times over
    env = dict(os.environ, LAYERTRACK_DATA_DIR=str(data), LAYERTRACK_CHECKPOINT_ROOTS=str(out),
               LAYERTRACK_DATABASE_URL="", LAYERTRACK_BROKER_URL="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print(f"starting an embedded layertrack (data in {data}) ...", file=sys.stderr)
    log = open(out / "service.log", "ab")  # noqa: SIM115  (kept open for the child's lifetime)
    proc = subprocess.Popen([sys.executable, "-m", "layertrack.service.cli", "up", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"error: the embedded service exited; see {out / 'service.log'}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"error: the embedded service did not start; see {out / 'service.log'}")
            time.sleep(0.3)
        token = json.loads((data / "client.json").read_text())["token"]
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        yield url, token
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


# ------------------------------------------------------------------ training
def train_phase(*, model, tokenizer, data, out_dir: Path, steps: int, plan: Plan, save_at: list[int],
                callback, regularizer: str | None, lam: float, seed: int):
    from layertrack.integrations.regularizer import RegularizedTrainer
    from transformers import TrainerCallback, TrainingArguments, default_data_collator

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in save_at:
                control.should_save = True

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=plan.batch, learning_rate=plan.lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.01,
        logging_steps=max(1, steps // 10),
        save_strategy="no", save_only_model=True, report_to="none", use_cpu=True, seed=seed,
        dataloader_num_workers=0, disable_tqdm=False,
    )
    trainer = RegularizedTrainer(
        model=model, args=args, train_dataset=data, data_collator=default_data_collator, processing_class=tokenizer,
        callbacks=[SaveAt(), callback], regularizer=regularizer or "cosine", reg_lambda=lam if regularizer else 0.0,
    )
    trainer.train()
    return trainer


def wait_for(client, runs: list[str], expected: int, timeout: float = 3600) -> list[dict]:
    from tqdm.auto import tqdm

    deadline = time.monotonic() + timeout
    with tqdm(total=expected, desc="scoring", unit="ckpt") as bar:
        while True:
            jobs = [j for r in runs for j in client.jobs(run=r, limit=1000)]
            done = [j for j in jobs if j["status"] in ("succeeded", "failed", "cancelled")]
            bar.update(len(done) - bar.n)
            if len(jobs) >= expected and len(done) == len(jobs):
                return jobs
            if time.monotonic() > deadline:
                raise SystemExit(f"error: {len(jobs) - len(done)} job(s) still unfinished after {timeout:g} s")
            time.sleep(1)


# ------------------------------------------------------------------ results
def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when undefined."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None


def plots(out: Path, trends: dict[str, dict[str, dict]], heatmaps: dict[str, dict], parent_step: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, (phase, runs) in zip(axes, trends.items(), strict=True):
        for metric, t in runs.items():
            ax.plot(t["steps"], t["values"], marker="o", label=metric)
        if phase == "pretrain":
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training step" + (f" (fine-tuning, from pretraining step {parent_step})"
                                         if phase == "finetune" else ""))
        ax.set_ylabel("layer-mean score")
        ax.set_title(f"{phase}: layer-mean linearity")
        ax.grid(alpha=0.3)
        ax.legend()
    path = out / "trend.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    files.append(path)
    for phase, h in heatmaps.items():
        fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
        # the last pair ends in the final norm: a different kind of map, left out (as in trends)
        keep = [k for k, layer in enumerate(h["layers"]) if layer not in h.get("final_norm_layers", [])]
        values = [[math.nan if row[k] is None else row[k] for k in keep] for row in h["values"]]
        im = ax.imshow(list(map(list, zip(*values, strict=True))), aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(h["steps"])), [str(s) for s in h["steps"]], rotation=45)
        ax.set_yticks(range(len(keep)), [f"{h['layers'][k]}→{h['layers'][k] + 1}" for k in keep])
        ax.set_xlabel("training step")
        ax.set_ylabel("block (hidden state i → i+1)")
        ax.set_title(f"{phase}: {h['metric']} per block")
        fig.colorbar(im, ax=ax, label=h["metric"])
        path = out / f"heatmap_{phase}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    return files


def run_demo(args: argparse.Namespace) -> int:
    import torch
    from layertrack.integrations.hf import LayertrackCallback
    from transformers import LlamaConfig, LlamaForCausalLM

    from .client import Client

    plan = dataclasses.replace(PLANS["short" if args.short else "default"])
    if args.pretrain_steps:
        plan.pretrain_steps = args.pretrain_steps
    if args.finetune_steps:
        plan.finetune_steps = args.finetune_steps
    if args.hidden:
        if args.hidden % plan.heads:
            raise SystemExit(f"error: --hidden must be a multiple of {plan.heads} (the number of heads)")
        plan.hidden = args.hidden
    if args.layers:
        plan.layers = args.layers
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    t0 = time.monotonic()
    torch.manual_seed(args.seed)

    print("building the corpus (standard-library docstrings) and the tokenizer ...", file=sys.stderr)
    docs = stdlib_docstrings()
    random.Random(args.seed).shuffle(docs)
    task = addition_task(4000 if not args.short else 200, args.seed)
    tokenizer = train_tokenizer(docs + task[:200], plan.vocab)
    pre_data = blocks_of(tokenizer, docs, plan.seq_len)
    ft_data = blocks_of(tokenizer, task, plan.seq_len)
    cfg = LlamaConfig(hidden_size=plan.hidden, intermediate_size=4 * plan.hidden, num_hidden_layers=plan.layers,
                      num_attention_heads=plan.heads, num_key_value_heads=plan.heads, vocab_size=len(tokenizer),
                      max_position_embeddings=max(256, plan.seq_len), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: Llama, d={plan.hidden}, {plan.layers} blocks, {n_params:.2f} M parameters; "
          f"pretraining corpus {len(docs)} docstrings ({len(pre_data)} sequences of {plan.seq_len}); "
          f"fine-tuning task {len(task)} additions", file=sys.stderr)
    pre_steps = log_spaced(plan.pretrain_steps, plan.n_saves)
    ft_steps = log_spaced(plan.finetune_steps, max(3, plan.n_saves // 2))
    reg = dict(regularizer=args.regularizer, lam=args.reg_lambda)
    pre_run, ft_run = f"{name}-pretrain", f"{name}-finetune"

    with service(args.url, args.token, out) as (url, token):
        common = dict(url=url, token=token, config=plan.score_config, spool_dir=out / "spool", flush_timeout_s=120)
        print(f"pretraining {plan.pretrain_steps} steps, posting steps {pre_steps} as run {pre_run} to {url}",
              file=sys.stderr)
        train_phase(model=model, tokenizer=tokenizer, data=pre_data, out_dir=out / "pretrain",
                    steps=plan.pretrain_steps, plan=plan, save_at=pre_steps, seed=args.seed,
                    callback=LayertrackCallback(run=pre_run, phase="pretrain", **common), **reg)
        last = out / "pretrain" / f"checkpoint-{plan.pretrain_steps}"
        ft_model = LlamaForCausalLM.from_pretrained(last)
        print(f"fine-tuning {plan.finetune_steps} steps on additions, posting steps {ft_steps} as run {ft_run}",
              file=sys.stderr)
        train_phase(model=ft_model, tokenizer=tokenizer, data=ft_data, out_dir=out / "finetune",
                    steps=plan.finetune_steps, plan=plan, save_at=ft_steps, seed=args.seed,
                    callback=LayertrackCallback(run=ft_run, phase="finetune", parent_run=pre_run,
                                                parent_step=plan.pretrain_steps, **common), **reg)
        with Client(url, token) as c:
            rep_cfg = {**plan.score_config, "replaceability": True, "holdout_tokens": plan.holdout_tokens}
            for run, step, phase_dir in ((pre_run, plan.pretrain_steps, "pretrain"),
                                         (ft_run, plan.finetune_steps, "finetune")):
                c.submit(run=run, step=step, uri=str(out / phase_dir / f"checkpoint-{step}"), config=rep_cfg)
            jobs = wait_for(c, [pre_run, ft_run], len(pre_steps) + len(ft_steps) + 2)
            failed = [j for j in jobs if j["status"] != "succeeded"]
            for j in failed:
                print(f"warning: job {j['id']} (run {j['run']} step {j['step']}) {j['status']}: {j['error']}",
                      file=sys.stderr)
            trends = {phase: {m: c.trend(run, metric=m, max_points=1000) for m in (*METRICS, "cosine")}
                      for phase, run in (("pretrain", pre_run), ("finetune", ft_run))}
            heatmaps = {}
            for phase, run in (("pretrain", pre_run), ("finetune", ft_run)):
                heatmaps[phase] = c.heatmap(run, metric="linearity_nores", max_steps=1000)
                heatmaps[phase]["final_norm_layers"] = [
                    s["layer"] for s in c.scores(run, metric="linearity_nores", max_points=2)["series"]
                    if s["final_norm"]]
            replace = {}
            for phase, run, step in (("pretrain", pre_run, plan.pretrain_steps),
                                     ("finetune", ft_run, plan.finetune_steps)):
                per = {}
                for m in (*METRICS, "loss_delta_linear", "loss_delta_drop"):
                    for s in c.scores(run, metric=m, from_step=step, to_step=step)["series"]:
                        if not s["final_norm"]:
                            per.setdefault(s["layer"], {})[m] = s["values"][0] if s["values"] else None
                layers = sorted(per)
                col = {m: [per[i].get(m) for i in layers] for m in (*METRICS, "loss_delta_linear", "loss_delta_drop")}
                replace[phase] = {
                    "step": step, "layers": layers, **col,
                    "spearman": {f"{a}~{b}": spearman(col[a], col[b])
                                 for a in METRICS for b in ("loss_delta_linear", "loss_delta_drop")},
                }

    # ---- the table
    print()
    print(f"{'run':<34} {'step':>6} " + " ".join(f"{m:>16}" for m in (*METRICS, "cosine")))
    for phase, run in (("pretrain", pre_run), ("finetune", ft_run)):
        t = trends[phase]
        for i, step in enumerate(t["linearity"]["steps"]):
            vals = [t[m]["values"][i] for m in (*METRICS, "cosine")]
            print(f"{run:<34} {step:>6} " + " ".join(f"{v:>16.6f}" if v is not None else f"{'-':>16}" for v in vals))
    print()
    for phase, r in replace.items():
        print(f"{phase} step {r['step']}: per block linearity_nores / Δloss linear / Δloss drop")
        for i, layer in enumerate(r["layers"]):
            vals = (r["linearity_nores"][i], r["loss_delta_linear"][i], r["loss_delta_drop"][i])
            print(f"  block {layer:>2}: " + "  ".join("-" if v is None else f"{v:.6f}" for v in vals))
        for k, v in r["spearman"].items():
            print(f"  Spearman {k}: {'-' if v is None else f'{v:+.3f}'}")
    files = plots(out, {p: {m: trends[p][m] for m in METRICS} for p in trends}, heatmaps, plan.pretrain_steps)
    summary = {
        "name": name, "runs": {"pretrain": pre_run, "finetune": ft_run}, "plan": vars(plan),
        "regularizer": args.regularizer, "lambda": args.reg_lambda if args.regularizer else 0.0,
        "posted_steps": {"pretrain": pre_steps, "finetune": ft_steps}, "trends": trends, "replaceability": replace,
        "failed_jobs": [j["id"] for j in failed], "wall_time_s": time.monotonic() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print("wrote " + ", ".join(str(f) for f in [*files, out / "summary.json"]))
    print(f"demo finished in {summary['wall_time_s'] / 60:.1f} min")
    return 0 if not failed else 1
