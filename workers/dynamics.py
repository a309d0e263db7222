"""How a checkpoint's layers changed since an earlier one: ``weight_update`` per block.

    weight_update(block)  ‖W_t − W_prev‖_F / ‖W_prev‖_F, with all of the block's tensors taken
                          together as one vector; the same per kind of tensor (attention,
                          MLP, norms) in the job's result

It needs no probe and no forward pass: the two checkpoints' tensors are read one pair at a
time (each in its stored dtype, differenced and squared in float64), so neither model is ever
held whole; the cost is reading both checkpoints once. Definitions: docs/engine.md, "Between
checkpoints".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import inspect_checkpoint
from .errors import CheckpointError, CheckpointsDiffer
from .planner import find_block_prefix
from .streaming import WeightSource, read_header

#: what kind a block's tensor is, by its name (first match wins); others count in the total only
KINDS = (
    ("attention", re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)\.")),
    ("mlp", re.compile(r"(^|\.)(mlp|feed_forward|ffn|fc\d?)\.")),
    ("norm", re.compile(r"(norm|(^|\.)ln_?\d*)(\.|$)")),
)


def kind_of(name: str) -> str | None:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return None


@dataclass
class BlockUpdate:
    block: int
    #: ‖ΔW‖_F / ‖W_prev‖_F over the whole block (NaN when the earlier block is all zeros)
    weight_update: float
    #: the same per kind of tensor
    kinds: dict[str, float] = field(default_factory=dict)


def _ratio(delta_sq: float, prev_sq: float) -> float:
    return math.sqrt(delta_sq / prev_sq) if prev_sq > 0 else float("nan")


def _source(path: Path) -> tuple[WeightSource, int]:
    """The checkpoint's tensors and its number of blocks."""
    info = inspect_checkpoint(path, check_causal_lm=False)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(info.config.get(key), int):
            break
    else:
        raise CheckpointError(f"the config.json of {str(path)!r} names no number of blocks (num_hidden_layers)")
    return WeightSource(path, {f: read_header(path / f) for f in info.weight_files}), info.config[key]


def weight_updates(current: Path, previous: Path) -> list[BlockUpdate]:
    """``weight_update`` of every block of ``current`` against ``previous`` (safetensors
    checkpoint directories of the same architecture), reading each tensor pair once."""
    (now, n_blocks), (before, _) = _source(Path(current)), _source(Path(previous))
    prefix = find_block_prefix(now.table, n_blocks)
    names = sorted(n for n in now.table if n.startswith(prefix + "."))
    missing = sorted(set(names) - set(before.table))
    if missing:
        raise CheckpointsDiffer(f"{previous} has no tensor {missing[0]!r} (and {len(missing) - 1} more) that {current} "
                                "has: the two checkpoints are not the same architecture, so their weights cannot "
                                "be compared")
    sums: dict[int, dict[str, list[float]]] = {}
    for name in names:
        a, b = now.load(name), before.load(name)
        if a.shape != b.shape:
            raise CheckpointsDiffer(f"tensor {name!r} is {list(a.shape)} in {current} and {list(b.shape)} in "
                                    f"{previous}: the two checkpoints are not the same architecture")
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        delta, prev = float((a64 - b64).square().sum()), float(b64.square().sum())
        block = int(name[len(prefix) + 1:].split(".", 1)[0])
        per = sums.setdefault(block, {})
        for key in ("total", kind_of(name[len(prefix) + 1:])):
            if key is not None:
                acc = per.setdefault(key, [0.0, 0.0])
                acc[0] += delta
                acc[1] += prev
        del a, b, a64, b64
    return [BlockUpdate(block=i, weight_update=_ratio(*sums[i].pop("total")),
                        kinds={k: _ratio(*v) for k, v in sorted(sums[i].items())})
            for i in sorted(sums)]



class DriftStats:
    """Streamed statistics of ``drift_cka`` for hidden states 0 … n_hidden−1: per hidden state
    i, with X its tokens' values in this checkpoint and Y in the earlier one (the same probe
    tokens, batch by batch), Σx̃, Σỹ, Σx̃x̃ᵀ, Σỹỹᵀ and Σx̃ỹᵀ in float64 (x̃, ỹ minus a pivot,
    the first batch's mean), so that

        drift_cka = 1 − ‖C_xy‖²_F / (‖C_xx‖_F · ‖C_yy‖_F)

    with C the centred cross- and auto-Grams is exact without keeping a hidden state: 0 when
    the layer's representation is unchanged up to rotation and scale, towards 1 when it
    changed completely. 3·d² float64 numbers per hidden state (``bytes``)."""

    def __init__(self, d: int, n_hidden: int, *, device: torch.device | str = "cpu"):
        self.d, self.n_hidden = d, n_hidden
        z = {"device": torch.device(device), "dtype": torch.float64}
        self.n = [0] * n_hidden
        self.pivots: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_hidden
        self.sum_x = torch.zeros(n_hidden, d, **z)
        self.sum_y = torch.zeros(n_hidden, d, **z)
        self.gram_x = [torch.zeros(d, d, **z) for _ in range(n_hidden)]
        self.gram_y = [torch.zeros(d, d, **z) for _ in range(n_hidden)]
        self.cross = [torch.zeros(d, d, **z) for _ in range(n_hidden)]

    @staticmethod
    def bytes(d: int, n_hidden: int) -> int:
        return n_hidden * (3 * d * d + 2 * d) * 8

    def add(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fold one batch of hidden state i: ``x`` (this checkpoint) and ``y`` (the earlier one),
        each (n_b, d) over the same tokens in the same order."""
        if x.shape != y.shape or x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected two (n, {self.d}) tensors over the same tokens, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        x64 = x.to(device=self.sum_x.device, dtype=torch.float64)
        y64 = y.to(device=self.sum_x.device, dtype=torch.float64)
        if self.pivots[i] is None:
            self.pivots[i] = (x64.mean(0), y64.mean(0))
        px, py = self.pivots[i]
        xc, yc = x64 - px, y64 - py
        self.sum_x[i] += xc.sum(0)
        self.sum_y[i] += yc.sum(0)
        self.gram_x[i].addmm_(xc.T, xc)
        self.gram_y[i].addmm_(yc.T, yc)
        self.cross[i].addmm_(xc.T, yc)
        self.n[i] += x.shape[0]

    def drift(self) -> list[float]:
        """drift_cka of every hidden state (NaN where a hidden state does not vary)."""
        out = []
        for i in range(self.n_hidden):
            n = self.n[i]
            if n < 2:
                out.append(float("nan"))
                continue
            sx, sy = self.sum_x[i], self.sum_y[i]
            cxx = self.gram_x[i] - torch.outer(sx, sx) / n
            cyy = self.gram_y[i] - torch.outer(sy, sy) / n
            cxy = self.cross[i] - torch.outer(sx, sy) / n
            denom = float(torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy))
            # CKA is within [0, 1]; rounding can put it a few ulps outside (an unchanged layer's
            # drift at -1e-17): the drift is clamped into [0, 1]
            out.append(min(1.0, max(0.0, 1.0 - float(cxy.square().sum()) / denom)) if denom > 0 else float("nan"))
        return out
