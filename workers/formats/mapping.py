"""How a framework's tensors become a transformers model's parameters.

A format describes its mapping as :class:`Target` entries, one per parameter of the
transformers architecture: which checkpoint tensors it is made from and the transform that
makes it (a rename is the identity; Conv1D layouts are transposed; a fused QKV is split; a
bias the framework does not have is zeros, which computes what its absence does). Before any
weight is read, :func:`check` compares the mapping with the architecture's parameters and
with the checkpoint's tensors: a parameter left unfilled or a checkpoint tensor left unused
fails with both lists (``mapping_incomplete``), so a model is never half random.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import MappingIncomplete

#: ``transform(tensors read from the sources, in order) -> the parameter``
Transform = Callable[[list[Any]], Any]


def same(parts: list[Any]) -> Any:
    return parts[0]


def transposed(parts: list[Any]) -> Any:
    """A ``nn.Linear`` weight ``[out, in]`` as a transformers ``Conv1D`` weight ``[in, out]``."""
    return parts[0].t().contiguous()


def zeros(shape: tuple[int, ...], dtype: str) -> Transform:
    """A parameter the framework does not have, whose zeros compute what its absence does
    (a bias of a bias-free layer)."""

    def make(_parts: list[Any]) -> Any:
        import torch

        return torch.zeros(shape, dtype=getattr(torch, dtype))

    return make


@dataclass(frozen=True)
class Target:
    """One parameter of the transformers model and how it is made."""

    name: str
    sources: tuple[str, ...]
    transform: Transform = same


def check(targets: Iterable[Target], parameters: Iterable[str], tensors: Iterable[str], *, ignored: Iterable[str] = (),
          what: str = "the checkpoint") -> None:
    """Fail (``mapping_incomplete``) unless the targets fill every parameter exactly once and use
    every checkpoint tensor not in ``ignored`` (buffers a framework saves that are not weights)."""
    targets = list(targets)
    made = [t.name for t in targets]
    wanted, have = set(parameters), set(tensors)
    used = {s for t in targets for s in t.sources}
    unfilled = sorted(wanted - set(made))
    unknown = sorted(set(made) - wanted)
    unused = sorted(have - used - set(ignored))
    missing = sorted(used - have)
    twice = sorted({n for n in made if made.count(n) > 1})
    if not (unfilled or unknown or unused or missing or twice):
        return

    def listed(names: list[str]) -> str:
        return ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")

    parts = []
    if unfilled:
        parts.append(f"model parameters nothing fills: {listed(unfilled)}")
    if unused:
        parts.append(f"checkpoint tensors nothing uses: {listed(unused)}")
    if missing:
        parts.append(f"checkpoint tensors the mapping needs but {what} lacks: {listed(missing)}")
    if unknown:
        parts.append(f"mapped names the model does not have: {listed(unknown)}")
    if twice:
        parts.append(f"parameters filled twice: {listed(twice)}")
    raise MappingIncomplete(
        f"{what} does not map onto its transformers architecture ({'; '.join(parts)}); layertrack does not score a "
        "partly filled model. Check that the architecture (--model-config) is the one the checkpoint was trained "
        "with, or that --format names the framework that wrote it"
    )


def materialize(targets: Iterable[Target], read: Callable[[str], Any]) -> dict[str, Any]:
    """``{parameter: tensor}``, each source read once through ``read(name)`` even where several
    targets share it (tied weights)."""
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = read(name)
        return cache[name]

    return {t.name: t.transform([get(s) for s in t.sources]) for t in targets}


def renamed(names: Mapping[str, str]) -> list[Target]:
    """Targets that are the source under another name (``{parameter: source}``)."""
    return [Target(p, (s,)) for p, s in names.items()]
