"""The memory planner: decide, before a model is loaded, how a job runs within a budget.

Everything here is a pure function of numbers read from the checkpoint's safetensors
headers (tensor names, shapes, dtypes; no weight is read), the model's config, the job's
dtype and probe size, and the worker's budget. ``plan_memory`` answers:

* **resident** — every weight on the device for the whole job (the fastest), when the
  weights and one batch's activations fit the budget; otherwise
* **streamed** — the module tree is built without weights and each block's tensors are read
  from disk just before the block runs and freed after it. A tensor outside the blocks is held
  only in the stage that uses it: the input embeddings while a pass embeds its sequences
  (then freed; the next pass reads them again), the final norm (and the LM head, when loaded)
  while the last block's output goes through them. Weights then cost one block (two when the
  next block is read while this one runs) plus, at most, the tensors of one such stage.
* **passes** — a streamed pass takes its sequences through block 0, then all of them through
  block 1, and so on, so each block's weights cross to the device once per pass. The
  hidden states of the pass's sequences wait between blocks: the number of passes is the
  smallest that keeps them within what the budget leaves.
* **hidden states** — on the device, or (CUDA only) in host memory when even one pass's
  would not fit the device; each batch then visits the device for its block.

The statistics of the engine (float64, ``stats_bytes``) are budgeted on their own (the
``stats_memory_budget``); the budget here is for weights and activations. The model is
described in docs/engine.md ("Memory plan").
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from .errors import PlanDoesNotFit

#: safetensors dtype name → bytes per element
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
    "C64": 8,
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}

#: share of the free memory a default budget takes (the rest is headroom for the allocator,
#: the tokenizer, the interpreter and whatever else the machine runs)
DEFAULT_BUDGET_SHARE = 0.8

_BLOCK_NAME = re.compile(r"^(.*?)\.(\d+)\.")
#: the input embeddings' weight under each family's name: needed only to embed a pass's
#: sequences (the tail stage runs without them)
INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in)\.weight$")


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model, in the job's dtype."""

    n_blocks: int
    d: int
    ffn: int
    n_heads: int
    block_bytes: tuple[int, ...]
    #: the tensors outside the blocks (embeddings, final norm, LM head when loaded)
    other_bytes: int
    #: the name prefix of the block list in the checkpoint (``model.layers``, ``transformer.h``)
    block_prefix: str = ""
    #: of ``other_bytes``: the input embeddings (``INPUT_EMBEDDING``), used only by the embed stage
    input_embedding_bytes: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(self.block_bytes) + self.other_bytes

    @property
    def max_block_bytes(self) -> int:
        return max(self.block_bytes)

    @property
    def tail_bytes(self) -> int:
        """The non-block tensors the tail stage reads (all but the input embeddings)."""
        return self.other_bytes - self.input_embedding_bytes


def block_of(name: str, prefix: str) -> int | None:
    """The block index of tensor ``name`` when it lies under ``prefix.<i>.``, else None."""
    if prefix and name.startswith(prefix + "."):
        head = name[len(prefix) + 1:].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return None


def find_block_prefix(names: Iterable[str], n_blocks: int) -> str:
    """The prefix under which the checkpoint's tensors are numbered 0 … n_blocks − 1."""
    indices: dict[str, set[int]] = {}
    for name in names:
        m = _BLOCK_NAME.match(name)
        if m:
            indices.setdefault(m[1], set()).add(int(m[2]))
    fits = [p for p, seen in indices.items() if seen == set(range(n_blocks))]
    if not fits:
        raise ValueError(f"no tensor names are numbered like {n_blocks} blocks (…layers.0. … "
                         f"…layers.{n_blocks - 1}.)")
    return min(fits, key=len)


def model_shape(tensors: Mapping[str, tuple[str, list[int]]], config: Mapping, *, dtype_bytes: int,
                skip: Iterable[str] = ()) -> ModelShape:
    """A ModelShape from the checkpoint's tensors (name → (safetensors dtype, shape)) and its
    config (hidden size, blocks, heads, MLP width under any family's names). Floating-point
    tensors count at ``dtype_bytes`` (the job's dtype: they are cast on load); others at
    their own width. Tensors whose name starts with one of ``skip`` are left out (the LM head
    when only the base model is loaded)."""
    def get(*keys: str, default: int | None = None) -> int:
        for k in keys:
            v = config.get(k)
            if isinstance(v, int) and v > 0:
                return v
        if default is None:
            raise ValueError(f"the config has none of {', '.join(keys)}")
        return default

    n_blocks = get("num_hidden_layers", "n_layer", "num_layers")
    d = get("hidden_size", "n_embd", "d_model")
    ffn = get("intermediate_size", "ffn_dim", "n_inner", default=4 * d)
    n_heads = get("num_attention_heads", "n_head", default=max(1, d // 64))
    skip = tuple(skip)
    names = [n for n in tensors if not n.startswith(skip)] if skip else list(tensors)
    prefix = find_block_prefix(names, n_blocks)
    blocks = [0] * n_blocks
    other = embedding = 0
    for name in names:
        dtype, shape = tensors[name]
        size = math.prod(shape) * (dtype_bytes if dtype in FLOAT_DTYPES else DTYPE_BYTES.get(dtype, 4))
        i = block_of(name, prefix)
        if i is None:
            other += size
            if INPUT_EMBEDDING.search(name):
                embedding += size
        else:
            blocks[i] += size
    return ModelShape(n_blocks=n_blocks, d=d, ffn=ffn, n_heads=n_heads, block_bytes=tuple(blocks),
                      other_bytes=other, block_prefix=prefix, input_embedding_bytes=embedding)


def activation_bytes(shape: ModelShape, *, batch_sequences: int, seq_len: int, dtype_bytes: int) -> int:
    """Working memory of one batch inside one block, in the model's dtype: the residual stream
    and its temporaries (6 · t · d), the MLP's intermediate (3 · t · ffn) and the attention
    weights where they are materialised (2 · sequences · heads · seq_len²), t = tokens."""
    t = batch_sequences * seq_len
    attention = 2 * batch_sequences * shape.n_heads * seq_len * seq_len
    return dtype_bytes * (6 * t * shape.d + 3 * t * shape.ffn + attention)


def fold_bytes(d: int, *, batch_sequences: int, seq_len: int) -> int:
    """The engine's float64 work buffers for folding one batch into the statistics."""
    return 8 * 7 * batch_sequences * seq_len * d


@dataclass(frozen=True)
class Plan:
    mode: str  # "resident" | "streamed"
    passes: int
    sequences_per_pass: int
    batch_sequences: int
    hidden_states: str  # "device" | "host"
    prefetch: bool  # streamed: the next block is read while one runs
    budget: int
    weight_bytes: int
    #: predicted peak of weights and activations (what the budget bounds)
    peak_bytes: int
    #: the engine's float64 statistics and work buffers, on top of peak_bytes
    stats_bytes: int
    devices: tuple[str, ...] = ("cpu",)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["devices"] = list(self.devices)
        return out

    def describe(self) -> str:
        lines = [
            f"plan: {self.mode}, {self.passes} pass{'es' if self.passes != 1 else ''} over the probe "
            f"({self.sequences_per_pass} sequences per pass, {self.batch_sequences} per batch)",
            f"weights {fmt_bytes(self.weight_bytes)}; budget {fmt_bytes(self.budget)} on {', '.join(self.devices)}",
            f"predicted peak {fmt_bytes(self.peak_bytes)} (weights and activations) + "
            f"{fmt_bytes(self.stats_bytes)} (statistics)",
            f"hidden states of a pass: on the {self.hidden_states}"
            + ("; the next block is read while one runs" if self.mode == "streamed" and self.prefetch else ""),
        ]
        return "\n".join(lines)


def streamed_stage_peak(shape: ModelShape, *, act: int, batch_bytes: int, prefetch: bool) -> int:
    """Weights and activations of a streamed job at its worst stage, hidden states of the pass
    aside: the embed stage holds every non-block tensor and a batch's embeddings (twice
    ``batch_bytes``, a batch's hidden state), the block stage a block and its activations
    (``act``), the tail stage the non-block tensors but the input embeddings, beside the
    last block; the block staging buffers (two with ``prefetch``) persist from pass to pass."""
    staging = shape.max_block_bytes * (2 if prefetch else 1)
    return staging + max(shape.other_bytes + 2 * batch_bytes, shape.tail_bytes + act, act)


def plan_memory(shape: ModelShape, *, dtype_bytes: int, n_sequences: int, seq_len: int, batch_sequences: int,
                budget: int, stats_bytes: int = 0, device_type: str = "cpu", devices: tuple[str, ...] = ("cpu",),
                force: str | None = None) -> Plan:
    """Decide resident or streamed, the passes and where hidden states live (module doc).

    ``budget``: bytes for weights and activations, summed over ``devices``. ``force``:
    "resident" or "streamed" to choose the mode (still checked against the budget when
    streamed). Raises PlanDoesNotFit, with the numbers, when even one streamed block with
    one batch does not fit."""
    batch_sequences = max(1, min(batch_sequences, n_sequences))
    act = activation_bytes(shape, batch_sequences=batch_sequences, seq_len=seq_len, dtype_bytes=dtype_bytes)
    stats = stats_bytes + fold_bytes(shape.d, batch_sequences=batch_sequences, seq_len=seq_len)
    common = dict(batch_sequences=batch_sequences, budget=budget, weight_bytes=shape.weight_bytes,
                  stats_bytes=stats, devices=tuple(devices))
    resident_peak = shape.weight_bytes + act
    if force != "streamed" and (resident_peak <= budget or force == "resident"):
        return Plan(mode="resident", passes=1, sequences_per_pass=n_sequences, hidden_states="device",
                    prefetch=False, peak_bytes=resident_peak, **common)

    per_sequence = seq_len * shape.d * dtype_bytes  # one sequence's hidden state between blocks

    def stage_peak(prefetch: bool) -> int:
        return streamed_stage_peak(shape, act=act, batch_bytes=batch_sequences * per_sequence, prefetch=prefetch)

    smallest = stage_peak(False) + batch_sequences * per_sequence
    if smallest > budget:
        raise PlanDoesNotFit(
            f"the model does not fit a budget of {fmt_bytes(budget)} even streamed: its largest block "
            f"({fmt_bytes(shape.max_block_bytes)}) with one batch's activations ({fmt_bytes(act)} for "
            f"{batch_sequences} sequences of {seq_len}), or beside it the tensors outside the blocks "
            f"({fmt_bytes(shape.other_bytes)}, the input embeddings {fmt_bytes(shape.input_embedding_bytes)} of it), "
            f"and its hidden states ({fmt_bytes(batch_sequences * per_sequence)}) need {fmt_bytes(smallest)}. "
            "Raise LAYERTRACK_MAX_MEMORY (--max-memory), lower --batch-size or --seq-len, or use a smaller --dtype")

    def layout(prefetch: bool) -> tuple[int, int, str, int] | None:
        """(passes, sequences per pass, where hidden states live, weights and activations), or None."""
        peak = stage_peak(prefetch)
        room = budget - peak
        if room < batch_sequences * per_sequence:
            return None
        hidden = "device"
        per_pass = (room // per_sequence) // batch_sequences * batch_sequences
        if device_type == "cuda" and per_pass < n_sequences:
            hidden, per_pass = "host", n_sequences  # host memory holds them; each batch visits the device
        per_pass = max(batch_sequences, min(per_pass, n_sequences))
        passes = math.ceil(n_sequences / per_pass)
        per_pass = min(math.ceil(n_sequences / passes / batch_sequences) * batch_sequences, n_sequences)
        return passes, per_pass, hidden, peak

    # reading the next block ahead hides the disk, but never at the cost of a pass (each pass
    # reads every block again)
    without = layout(False)
    ahead = layout(True)
    prefetch = ahead is not None and ahead[0] <= without[0]
    passes, per_pass, hidden, peak = ahead if prefetch else without
    held = (per_pass if hidden == "device" else batch_sequences) * per_sequence
    return Plan(mode="streamed", passes=passes, sequences_per_pass=per_pass, hidden_states=hidden,
                prefetch=prefetch, peak_bytes=peak + held, **common)


def fmt_bytes(n: int) -> str:
    """1536 → "1.5 KiB"; binary units, one decimal."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def parse_bytes(text: str) -> int:
    """``8GiB``, ``512MB``, ``256M``, ``1.5G``, ``1000000`` → bytes (binary multiples for
    K/M/G/T with or without ``iB``; ``kB``/``MB``/``GB``/``TB`` are decimal)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", text or "")
    if not m:
        raise ValueError(f"{text!r} is not a size: write bytes, or a number with K, M, G or T (e.g. 512MiB, 8GB)")
    value, unit, suffix = float(m[1]), m[2].upper(), m[3] or ""
    power = " KMGT".index(unit) if unit else 0
    base = 1000 if suffix == "B" and unit else 1024
    return int(value * base**power)


def most_common_dtype(tensors: Mapping[str, tuple[str, list[int]]]) -> str | None:
    counts = Counter(dtype for dtype, shape in tensors.values() if dtype in FLOAT_DTYPES)
    return counts.most_common(1)[0][0] if counts else None
