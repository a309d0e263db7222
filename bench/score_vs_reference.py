"""Scoring job vs the paper-style reference pipeline vs a bare forward pass.

    python bench/score_vs_reference.py                 # d=576, 30 blocks, 16k tokens, sweep 4k/16k/64k
    python bench/score_vs_reference.py --tokens 4096 --sweep 4096   # a quick look

Every pipeline runs in its own process on the same random-init Llama-shaped model (the
SmolLM-135M shape: d=576, 30 blocks, 134.5M parameters) and the same probe tokens:

  reference  batch-1 forward per sequence, all hidden states kept in memory, then a float32
             SVD least-squares solve per pair for linearity and for linearity_nores (the way
             the code of "Your Transformer is Secretly Linear", arXiv 2405.12250,
             computes them)
  engine     layertrack's scoring path (score_model): one batched forward with hooks and
             streamed float64 statistics (metrics defined in docs/engine.md)
  bare       the same batched forward, nothing computed or kept
  oracle     (for accuracy only, not timed) the float64 oracle (workers/reference.py) on all
             hidden states

All three call the model the same way: no attention mask for a batch without padding.
Printed per pipeline: wall time of the work after loading, peak RSS above the RSS right after
loading (VmHWM reset through /proc/self/clear_refs), and max |Δscore| vs the oracle over
linearity and linearity_nores of every pair. Model loading is excluded from all of them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152)
SEQ_LEN = 512


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model and tokens
def prepare(workdir: Path) -> Path:
    ckpt = workdir / "llama-135m-random"
    if (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file():
        return ckpt
    import torch
    from layertrack.workers.probe import default_probe
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    log(f"building the benchmark model in {ckpt} ...")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"], vocab_size=SHAPE["vocab"],
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(ckpt)
    # A byte-level BPE trained on the probe itself; 4096 entries keep >= 64k tokens in it.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(default_probe().documents, trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(ckpt)
    return ckpt


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


# ---------------------------------------------------------------- one pipeline per process
def child(mode: str, ckpt: Path, n_tokens: int) -> dict:
    import torch
    from layertrack.workers import checkpoint as C
    from layertrack.workers import reference
    from layertrack.workers.probe import default_probe, tokenize_probe
    from layertrack.workers.scoring import ScoreConfig, _mask_or_none, batch_tokens, score_model

    info = C.inspect_checkpoint(ckpt)
    model = C.load_model(info, device=torch.device("cpu"), dtype=torch.float32)
    tokens = tokenize_probe(default_probe(), C.load_tokenizer(ckpt), max_tokens=n_tokens, seq_len=SEQ_LEN)
    if tokens.n_tokens != n_tokens:
        raise SystemExit(f"the probe gives only {tokens.n_tokens} tokens, not {n_tokens}")
    ids = torch.tensor(tokens.input_ids)
    attn = torch.tensor(tokens.attention_mask)
    keep = torch.tensor(tokens.score_mask, dtype=torch.bool)
    bs = max(1, batch_tokens(torch.device("cpu")) // SEQ_LEN)
    out: dict = {"mode": mode, "n_tokens": tokens.n_tokens}

    import gc

    # The weights are memory-mapped: page them all in (and warm the kernels up) before the
    # baseline, or the first forward pass would count the model itself as "above the model".
    with torch.inference_mode():
        for param in model.parameters():
            param.sum()
        model(input_ids=ids[:1, :16], use_cache=False)
    gc.collect()
    base = rss_kib("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    if mode == "engine":
        scores, _ = score_model(model, tokens, config=ScoreConfig(seq_len=SEQ_LEN))
        out["linearity"] = scores.metric("linearity")
        out["linearity_nores"] = scores.metric("linearity_nores")
    elif mode == "bare":
        with torch.inference_mode():
            for s in range(0, ids.shape[0], bs):
                model(input_ids=ids[s : s + bs], attention_mask=_mask_or_none(attn[s : s + bs], "cpu"),
                      use_cache=False)
    elif mode == "reference":
        kept: list[list[torch.Tensor]] | None = None
        with torch.inference_mode():
            for s in range(ids.shape[0]):  # batch 1, all hidden states kept
                o = model(input_ids=ids[s : s + 1], attention_mask=_mask_or_none(attn[s : s + 1], "cpu"),
                          output_hidden_states=True)
                if kept is None:
                    kept = [[] for _ in o.hidden_states]
                for i, h in enumerate(o.hidden_states):
                    kept[i].append(h[0][keep[s]].clone())
        states = [torch.cat(chunks) for chunks in kept]
        del kept

        def lstsq_svd_f32(x, y):  # float32 SVD least squares on centred, normalised data
            x = x - x.mean(0)
            y = y - y.mean(0)
            x = x / x.norm()
            y = y / y.norm()
            u, sv, vh = torch.linalg.svd(x, full_matrices=False)
            a = vh.T @ ((u.T @ y) / sv[:, None])
            return float(1 - (x @ a - y).square().sum())

        out["linearity"] = [lstsq_svd_f32(x, y) for x, y in itertools.pairwise(states)]
        out["linearity_nores"] = [lstsq_svd_f32(x, y - x) for x, y in itertools.pairwise(states)]
    elif mode == "oracle":
        chunks: list[list[torch.Tensor]] = []
        with torch.inference_mode():
            for s in range(0, ids.shape[0], bs):
                o = model(input_ids=ids[s : s + bs], attention_mask=_mask_or_none(attn[s : s + bs], "cpu"),
                          output_hidden_states=True)
                chunks.append([h[keep[s : s + bs]].double() for h in o.hidden_states])
        states = [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]
        del chunks
        lin, nores = [], []
        for x, y in itertools.pairwise(states):
            lin.append(reference.linearity(x, y))
            nores.append(reference.linearity(x, y - x))
        out["linearity"], out["linearity_nores"] = lin, nores
    else:
        raise SystemExit(f"unknown mode {mode}")
    out["wall_s"] = time.perf_counter() - t0
    out["peak_above_model_mib"] = (rss_kib("VmHWM") - base) / 1024
    out["rss_after_load_mib"] = base / 1024
    return out


def run_child(mode: str, ckpt: Path, n_tokens: int) -> dict:
    log(f"  {mode:<9} {n_tokens:>6} tokens ...")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--ckpt", str(ckpt), "--tokens", str(n_tokens)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_delta(a: dict, b: dict) -> float:
    return max(
        abs(x - y) for m in ("linearity", "linearity_nores") for x, y in zip(a[m], b[m], strict=True)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--sweep", default="4096,16384,65536", help="token counts for the engine's memory sweep")
    p.add_argument("--workdir", default=os.environ.get("LAYERTRACK_BENCH_DIR", "/tmp/layertrack-bench"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.ckpt), args.tokens)))
        return

    import torch

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = prepare(workdir)
    cfg = json.loads((ckpt / "config.json").read_text())
    log(f"running on {ckpt} ({torch.get_num_threads()} torch threads)")
    res = {m: run_child(m, ckpt, args.tokens) for m in ("reference", "engine", "bare", "oracle")}
    ref, eng, bare, orc = res["reference"], res["engine"], res["bare"], res["oracle"]
    n_params = 134_515_008 if cfg["hidden_size"] == 576 else None
    print(
        f"model: random-init Llama, d={cfg['hidden_size']}, {cfg['num_hidden_layers']} blocks, "
        f"{n_params / 1e6:.1f}M parameters; {args.tokens} probe tokens in sequences of {SEQ_LEN}; "
        f"CPU, {torch.get_num_threads()} threads, float32 model"
    )
    print(f"{'pipeline':<22}{'wall s':>9}{'peak MiB above model':>23}{'max |Δ| vs oracle':>20}")
    for name, r in (("reference (paper)", ref), ("layertrack engine", eng), ("bare forward", bare)):
        delta = f"{max_delta(r, orc):.2e}" if "linearity" in r else "-"
        print(f"{name:<22}{r['wall_s']:>9.1f}{r['peak_above_model_mib']:>23.1f}{delta:>20}")
    print(
        f"engine vs reference: {ref['wall_s'] / eng['wall_s']:.2f}x faster, "
        f"{ref['peak_above_model_mib'] / eng['peak_above_model_mib']:.1f}x lower peak memory; "
        f"engine / bare forward = {eng['wall_s'] / bare['wall_s']:.3f}"
    )
    sweep = [int(t) for t in args.sweep.split(",") if t]
    if sweep:
        peaks = {}
        for t in sweep:
            peaks[t] = eng if t == args.tokens else run_child("engine", ckpt, t)
        line = ", ".join(f"{t} tokens {peaks[t]['peak_above_model_mib']:.1f} MiB" for t in sweep)
        growth = (peaks[sweep[-1]]["peak_above_model_mib"] / peaks[sweep[0]]["peak_above_model_mib"] - 1) * 100
        print(f"engine peak memory above model: {line}; growth {sweep[0]} -> {sweep[-1]}: {growth:+.1f} %")


if __name__ == "__main__":
    main()
