"""The ``layertrack`` command line.

    layertrack score PATH_OR_URI [--probe FILE] [--max-tokens N] [--seq-len N]
                     [--dtype float32|bfloat16|float16] [--drop-first-token] [--json]

This module imports no torch: commands that need the compute side import it when they run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

EXIT_USAGE = 2
EXIT_INPUT = 3


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layertrack",
        description="Track how the layers of a transformer language model change while it trains.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    score = sub.add_parser(
        "score",
        help="score every layer of one checkpoint on the probe text and print the table",
        description=(
            "Load a Hugging Face causal-LM checkpoint directory (safetensors), run the probe "
            "text through it once, and print per-layer linearity, residual-removed linearity, "
            "cosine, norm ratio and anisotropy."
        ),
    )
    score.add_argument("checkpoint", metavar="PATH_OR_URI", help="checkpoint directory or file:// URI")
    score.add_argument("--probe", metavar="FILE", help="UTF-8 .txt or .jsonl probe (default: built-in)")
    score.add_argument(
        "--max-tokens", type=_positive_int, metavar="N",
        help="tokens to score (default: max(16384, 8*d), capped by the probe)",
    )
    score.add_argument("--seq-len", type=_positive_int, default=512, metavar="N", help="tokens per sequence (512)")
    score.add_argument("--batch-size", type=_positive_int, metavar="N", help="sequences per forward pass (CPU: 2048 tokens)")
    score.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model dtype (CPU: float32, CUDA: bfloat16)")
    score.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    score.add_argument("--drop-first-token", action="store_true", help="do not score the first token of each sequence (attention sink)")
    score.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory, when the checkpoint has none")
    score.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin weights (loaded with weights_only=True)")
    score.add_argument("--seed", type=int, default=0, help="seed of the probe's document order (0)")
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=cmd_score)
    return parser


def _fmt(value: float | None, width: int = 10) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return f"{value:{width}.6f}"


def render_table(result: dict[str, Any]) -> str:
    pairs = {p["layer"]: p for p in result["pairs"]}
    layers = {s["layer"]: s for s in result["layers"]}
    lines = [
        f"model {result['model_type']}  blocks {result['n_layers']}  d {result['d']}  "
        f"dtype {result['dtype']}  device {result['device']}",
        f"n_tokens {result['n_tokens']}  chance {result['chance']:.4f}  "
        f"seq_len {result['seq_len']}  probe {result['probe_name']} ({result['probe_sha256'][:12]})",
        "",
        f"{'layer':>7} {'linearity':>10} {'lin_nores':>10} {'cosine':>10} {'norm_ratio':>10} {'anisotropy':>10}",
    ]
    flagged = False
    for i in sorted(layers):
        p = pairs.get(i)
        mark = ""
        if p and p.get("final_norm"):
            mark, flagged = " *", True
        label = f"{i}->{i + 1}" if p else f"{i}"
        lines.append(
            f"{label:>7} {_fmt(p and p['linearity'])} {_fmt(p and p['linearity_nores'])} "
            f"{_fmt(p and p['cosine'])} {_fmt(p and p['norm_ratio'])} {_fmt(layers[i]['anisotropy'])}{mark}"
        )
    if flagged:
        lines.append("")
        lines.append("* into the final-norm output: a different kind of map, not comparable to the others")
    for w in result.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def cmd_score(args: argparse.Namespace) -> int:
    try:
        from layertrack.workers.errors import LayertrackError
        from layertrack.workers.scoring import ScoreConfig, score_checkpoint
    except ImportError as e:
        print(
            f"error: scoring needs the worker extra ({e.name} is missing): "
            "pip install 'layertrack[worker]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    config = ScoreConfig(
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        drop_first_token=args.drop_first_token,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        allow_pickle=args.allow_pickle,
    )
    try:
        result = score_checkpoint(
            args.checkpoint,
            probe=args.probe,
            config=config,
            tokenizer_path=args.tokenizer,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    except LayertrackError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return EXIT_INPUT
    out = result.to_dict()
    if args.json:
        print(json.dumps(_finite(out), indent=2, allow_nan=False))
    else:
        print(render_table(out))
    return 0


def _finite(value: Any) -> Any:
    """JSON has no NaN: an undefined score (a block that does nothing) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
