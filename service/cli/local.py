"""Commands that compute on this machine, without the service: ``layertrack score`` (one
checkpoint, printed as a table or JSON) and ``layertrack demo`` (which trains here and uses
a service for the scoring). Both need the ``worker`` extra; they import it when they run."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from layertrack.workers.vocabulary import SCORE_OPTIONS

from .common import EXIT_USAGE, CliError, finite, fmt, stop_on_ctrl_c_and_sigterm


def _compute_side_missing(e: ImportError, extra: str) -> CliError:
    return CliError(f"this command needs the {extra} extra ({e.name} is missing): pip install 'layertrack[{extra}]'",
                    EXIT_USAGE)


def render_table(result: dict[str, Any]) -> str:
    """The score table: one row per block i → i+1 (and per hidden state for anisotropy,
    effective rank and massive activation)."""
    pairs = {p["layer"]: p for p in result["pairs"]}
    layers = {s["layer"]: s for s in result["layers"]}
    holdout = result.get("holdout")
    moved = any(p.get("weight_update") is not None for p in result["pairs"])
    drifted = any(s.get("drift_cka") is not None for s in result["layers"])
    lens = any(s.get("logit_lens_loss") is not None for s in result["layers"])
    lines = [
        f"model {result['model_type']}  blocks {result['n_layers']}  d {result['d']}  "
        f"dtype {result['dtype']}  device {result['device']}",
        f"n_tokens {result['n_tokens']}  chance {result['chance']:.4f}  "
        f"seq_len {result['seq_len']}  probe {result['probe_name']} ({result['probe_sha256'][:12]})",
        "",
        f"{'layer':>7} {'linearity':>10} {'lin_nores':>10} {'cosine':>10} {'norm_ratio':>10} {'anisotropy':>10} "
        f"{'eff_rank':>10} {'massive':>10}"
        + (f" {'Δloss_lin':>10} {'Δloss_drop':>10}" if holdout else "")
        + (f" {'w_update':>10}" if moved else "")
        + (f" {'drift_cka':>10}" if drifted else "")
        + (f" {'lens_loss':>10}" if lens else ""),
    ]
    flagged = False
    for i in sorted(layers):
        p = pairs.get(i)
        mark = ""
        if p and p.get("final_norm"):
            mark, flagged = " *", True
        label = f"{i}->{i + 1}" if p else f"{i}"
        lines.append(
            f"{label:>7} {fmt(p and p['linearity'])} {fmt(p and p['linearity_nores'])} "
            f"{fmt(p and p['cosine'])} {fmt(p and p['norm_ratio'])} {fmt(layers[i]['anisotropy'])} "
            f"{fmt(layers[i].get('effective_rank'))} {fmt(layers[i].get('massive_activation'))}"
            + (f" {fmt(p and p['loss_delta_linear'])} {fmt(p and p['loss_delta_drop'])}" if holdout else "")
            + (f" {fmt(p and p.get('weight_update'))}" if moved else "")
            + (f" {fmt(layers[i].get('drift_cka'))}" if drifted else "")
            + (f" {fmt(layers[i].get('logit_lens_loss'))}" if lens else "")
            + mark
        )
    if flagged:
        lines.append("")
        lines.append("* into the final-norm output: a different kind of map, not comparable to the others")
    if holdout:
        lines.append("")
        lines.append(f"Δloss: held-out LM loss (nats/token, {holdout['n_tokens']} tokens; intact "
                     f"{holdout['intact_loss']:.4f}) with the block replaced by its fitted linear map (lin) or "
                     "dropped (drop), minus intact")
    if lens:
        lines.append("")
        lines.append("lens_loss: next-token cross-entropy (nats/token) of hidden state i decoded through the final "
                     "norm and the LM head (the logit lens)")
    dynamics = result.get("dynamics") or {}
    if moved:
        lines.append("")
        lines.append(f"w_update: ‖W − W_prev‖ / ‖W_prev‖ of the block's weights against {dynamics['compared_to']}")
        if drifted:
            lines.append("drift_cka: 1 − linear CKA of hidden state i against the same hidden state of the earlier "
                         "checkpoint, on the same probe tokens")
        elif (dynamics.get("drift_cka") or {}).get("absent"):
            lines.append(f"drift_cka not measured: {dynamics['drift_cka']['absent']}")
    elif dynamics.get("absent"):
        lines.append("")
        lines.append(f"weight_update not measured: {dynamics['absent']}")
    for w in result.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _size_arg(text: str, what: str) -> int:
    from layertrack.workers.planner import parse_bytes

    try:
        value = parse_bytes(text)
    except ValueError as e:
        raise CliError(f"{what}: {e}", EXIT_USAGE) from None
    if value <= 0:
        raise CliError(f"{what} must be more than 0 bytes", EXIT_USAGE)
    return value


def size(text: str) -> int:
    """argparse type of --max-memory: bytes, or 512MiB, 8GB, 1.5G ..."""
    from layertrack.workers.planner import parse_bytes

    try:
        value = parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 bytes")
    return value


def cmd_score(args: argparse.Namespace) -> int:
    try:
        from layertrack.workers.checkpoint import pick_device
        from layertrack.workers.errors import DeviceUnavailable, LayertrackError
        from layertrack.workers.scoring import ScoreConfig, prepare, score_checkpoint
    except ImportError as e:
        raise _compute_side_missing(e, "worker") from None
    max_memory = args.max_memory
    if max_memory is None and os.environ.get("LAYERTRACK_MAX_MEMORY", "").strip():
        max_memory = _size_arg(os.environ["LAYERTRACK_MAX_MEMORY"], "LAYERTRACK_MAX_MEMORY")
    config = ScoreConfig(
        **{k: getattr(args, k) for k in SCORE_OPTIONS},  # the job options (the vocabulary's), then the local ones
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        max_memory=max_memory,
        compare_to=args.compare_to,
    )
    try:
        if args.device:  # before the checkpoint is read: a device this machine lacks is one line, at once
            pick_device(args.device)
        if args.plan:
            prep = prepare(args.checkpoint, probe=args.probe, config=config)
            if args.json:
                print(json.dumps(prep.plan.to_dict(), indent=2))
            else:
                cfg = prep.hf_config
                print(f"{prep.info.model_type}, {cfg.num_hidden_layers} blocks, d {cfg.hidden_size}, "
                      f"{prep.tokens.n_tokens} probe tokens in {len(prep.tokens.input_ids)} sequences of "
                      f"{prep.seq_len}, {str(prep.dtype).removeprefix('torch.')}")
                print(prep.plan.describe())
            return 0
        result = score_checkpoint(
            args.checkpoint,
            probe=args.probe,
            config=config,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    except DeviceUnavailable as e:
        raise CliError(f"--device {e.device}: {e.reason} (code {e.code})") from None
    except LayertrackError as e:  # one line with its code (the code a service job fails with), never a traceback
        raise CliError(f"{e.message} (code {e.code})") from None
    out = result.to_dict()
    if args.json:
        print(json.dumps(finite(out), indent=2, allow_nan=False))
    else:
        print(render_table(out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from layertrack.service.demo import DemoError, missing_requirement, run_demo

    missing = missing_requirement()
    if missing:
        raise CliError(f"the demo needs the worker and integrations extras ({missing} is missing): "
                       "pip install 'layertrack[worker,integrations]'", EXIT_USAGE)
    stop_on_ctrl_c_and_sigterm()  # an embedded service's processes are stopped on the way out
    try:
        return run_demo(args)
    except DemoError as e:
        raise CliError(str(e)) from None
