"""Load → tokenise the probe → batched forward passes → streamed statistics → scores.

Hidden states are taken with forward hooks (``HiddenStateTap``), in the same order and with
the same meaning as the model's own ``output_hidden_states=True``: h_0 is the input of the
first block (embedding output), h_i the output of block i − 1, and h_L the model's
``last_hidden_state`` (with the final norm applied in every supported family; that last pair
is flagged ``final_norm``). Each hidden state is folded into the statistics as soon as the
block produces it and then dropped, so memory holds one block's activations plus the
statistics, whatever n is. When the statistics of every layer do not fit in memory, the
layers are scored in groups, one forward pass each; a pass runs only the blocks it needs.

With ``ScoreConfig.replaceability`` the model is loaded with its LM head, and the held-out LM
loss is measured with each block replaced by its fitted affine map and with it dropped
(``replaceability``). The metrics are defined in docs/engine.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .engine import (
    EngineConfig,
    LayerScores,
    LinearMap,
    PairScores,
    Scores,
    StreamingStats,
    check_token_count,
    plan_layer_groups,
    stats_bytes,
)
from .errors import CheckpointChanged, CheckpointError, FormatUnsupported, OutOfMemory
from .planner import DEFAULT_BUDGET_SHARE, ModelShape, Plan, model_shape, plan_memory
from .probe import DEFAULT_SEED, Probe, ProbeTokens, load_probe, tokenize_probe
from .streaming import BlockRunner, WeightSource, build_streamed, read_header
from .vocabulary import (
    DEFAULT_HOLDOUT_TOKENS,
    DEFAULT_MIN_TOKENS,
    DEFAULT_SEQ_LEN,
    REPLACEABILITY_TOKENS_PER_DIM,
    WARN_TOKENS_PER_DIM,
)

#: default tokens per forward batch. On CPU a bigger batch is no faster (measured: 1 to 8
#: sequences of 512 within 10 %) and only costs memory; on CUDA it buys throughput.
BATCH_TOKENS = {"cpu": 1024, "cuda": 16384}


def batch_tokens(device: torch.device) -> int:
    return BATCH_TOKENS.get(device.type, BATCH_TOKENS["cpu"])


@dataclass(frozen=True)
class ScoreConfig:
    #: scored tokens; None: default_max_tokens(d), capped by the probe
    max_tokens: int | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    drop_first_token: bool = False
    batch_size: int | None = None  # sequences per forward; None: BATCH_TOKENS // seq_len
    dtype: str | None = None  # float32 | bfloat16 | float16; None: per device
    device: str | None = None  # None: cuda when present, else cpu
    stats_memory_budget: int | None = None  # bytes for statistics; None: automatic
    seed: int = DEFAULT_SEED
    allow_pickle: bool = False
    #: also measure linear replaceability: held-out LM loss with each block replaced by its
    #: fitted linear map, and dropped (2 forward passes over the held-out tokens per block)
    replaceability: bool = False
    #: held-out probe tokens for the replaceability losses (taken after the scored ones)
    holdout_tokens: int = DEFAULT_HOLDOUT_TOKENS
    #: also measure logit_lens_loss per hidden state (the model loaded with its LM head)
    logit_lens: bool = False
    #: bytes for weights and activations on the device(s) (LAYERTRACK_MAX_MEMORY); None:
    #: DEFAULT_BUDGET_SHARE of the free memory. The memory plan keeps within it.
    max_memory: int | None = None
    #: "resident" or "streamed" to override the plan's choice (tests, benchmarks)
    execution: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    #: the job option: measure weight_update against ``compare_to`` (None: when given;
    #: False: never)
    dynamics: bool | None = None
    #: an earlier checkpoint of the same architecture (a path under the roots) to measure
    #: weight_update against; the service sets it to the run's previous scored checkpoint
    compare_to: str | None = None
    #: the checkpoint's layout (workers/formats/native.py); None: detected
    format: str | None = None
    #: a transformers config.json (or its directory) for a checkpoint that carries no architecture
    model_config: str | None = None
    #: a tokenizer directory for a checkpoint saved without one
    tokenizer: str | None = None


@dataclass
class ScoreResult:
    scores: Scores
    model_type: str
    n_layers: int
    dtype: str
    device: str
    seq_len: int
    n_sequences: int
    n_passes: int
    probe_name: str
    probe_sha256: str
    tokenizer_fingerprint: str
    checkpoint_fingerprint: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: with replaceability: the held-out tokens and the intact model's loss on them (nats/token)
    holdout: dict[str, float] | None = None
    #: the memory plan the job ran with (planner.Plan.to_dict)
    plan: dict[str, Any] | None = None
    #: between checkpoints: ``compared_to`` (the earlier checkpoint) and ``weight_update_kinds``
    #: (per block, per kind of tensor), or ``absent`` (why it was not measured); None when
    #: not asked for
    dynamics: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "scores"}
        out.update(self.scores.to_dict())
        return out


def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (``layers``, ``h``, ``decoder.layers``, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"could not find the {n} transformer blocks of {type(model).__name__}")


def _mask_or_none(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """No mask for a batch without padding: attention can then take its causal fast path."""
    return None if bool(mask.all()) else mask.to(device)


def _auto_stats_budget(device: torch.device) -> int:
    """Half of the memory that is free now (CUDA: on the device; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) // 2


def default_max_tokens(d: int) -> int:
    """Scored tokens when the job names none: DEFAULT_MIN_TOKENS, and at least WARN_TOKENS_PER_DIM · d."""
    return max(DEFAULT_MIN_TOKENS, math.ceil(WARN_TOKENS_PER_DIM * d))


def _sequences_per_batch(tokens: ProbeTokens, batch_size: int | None, device: torch.device) -> int:
    return batch_size or max(1, batch_tokens(device) // tokens.seq_len)


def _layer_groups(n_hidden: int, d: int, budget: int | None, device: torch.device) -> list[tuple[int, int]]:
    """Groups of hidden states whose statistics fit the budget (None: half the free memory)."""
    if budget is None:
        budget = _auto_stats_budget(device)  # statistics live on the model's device
    if stats_bytes(2, d) > budget:
        raise OutOfMemory(
            f"the statistics of one block pair need {stats_bytes(2, d) / 2**30:.2f} GiB "
            f"(hidden size {d}) and only {budget / 2**30:.2f} GiB is available for them"
        )
    return plan_layer_groups(n_hidden, d, budget)


@contextlib.contextmanager
def _progress_reporter(progress: Callable[[int, int], None] | bool, total: int) -> Iterator[Callable[[int], None]]:
    """A function of the tokens done so far: a tqdm bar (``progress=True``), the caller's
    ``progress(done, total)``, or nothing."""
    if progress is True:
        from tqdm.auto import tqdm

        with tqdm(total=total, unit="tok", unit_scale=True, desc="forward", leave=False) as bar:
            yield lambda done: bar.update(done - bar.n)
    elif callable(progress):
        yield lambda done: progress(done, total)
    else:
        yield lambda done: None


@contextlib.contextmanager
def _first_blocks_only(blocks: torch.nn.ModuleList, n: int) -> Iterator[None]:
    """Let the model run only its first ``n`` blocks (a pass that needs no later hidden
    state skips their cost); the block list is restored on exit."""
    if n >= len(blocks):
        yield
        return
    later = list(blocks[n:])
    del blocks[n:]
    try:
        yield
    finally:
        blocks.extend(later)


class HiddenStateTap:
    """Forward hooks that feed hidden states ``stats.first … stats.last`` of every batch into
    ``stats``, each restricted to the batch's scored tokens.

    h_0 is taken by a pre-hook on block 0, h_i (0 < i < L) by a hook on block i − 1. h_L is the
    model's ``last_hidden_state``, which only exists once the forward has returned: pass the
    output to ``end_batch``. The last block's own output is kept until then, to see whether
    the model applies a final norm after it (``final_norm``).

    Use as a context manager (the hooks are removed on exit); per batch ``start_batch(keep)``,
    the forward, then ``end_batch(output)``.
    """

    def __init__(self, blocks: torch.nn.ModuleList, stats: StreamingStats):
        self.blocks = blocks
        self.stats = stats
        self.n_blocks = len(blocks)
        #: the first ``blocks_needed`` blocks produce every hidden state of this tap
        self.blocks_needed = stats.last
        #: whether h_L differs from the last block's output (None until a batch has told)
        self.final_norm: bool | None = None
        self._keep: torch.Tensor | None = None
        self._last_block_output: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def takes_last_hidden_state(self) -> bool:
        return self.stats.last == self.n_blocks

    def __enter__(self) -> HiddenStateTap:
        first, last, blocks = self.stats.first, self.stats.last, self.blocks
        if first == 0:
            self._handles.append(blocks[0].register_forward_pre_hook(self._take_input, with_kwargs=True))
        for i in range(max(first, 1), min(last, self.n_blocks - 1) + 1):
            self._handles.append(blocks[i - 1].register_forward_hook(self._output_taker(i)))
        if self.takes_last_hidden_state:
            self._handles.append(blocks[-1].register_forward_hook(self._keep_last_block_output))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start_batch(self, keep: torch.Tensor) -> None:
        """``keep``: the batch's (n_seq, seq_len) mask of scored tokens."""
        self._keep = keep

    def end_batch(self, output: Any) -> None:
        """Feed h_L from the model's output when this tap covers it."""
        if self.takes_last_hidden_state:
            h_last = output.last_hidden_state
            if self.final_norm is None:
                self.final_norm = not torch.equal(self._last_block_output, h_last)
            self._add(self.n_blocks, h_last)
        self._last_block_output = None

    def _add(self, i: int, h: torch.Tensor) -> None:
        keep = self._keep if self._keep.device == h.device else self._keep.to(h.device)  # blocks on several GPUs
        self.stats.add(i, h[keep])

    def _take_input(self, _module, args, kwargs) -> None:
        self._add(0, args[0] if args else kwargs["hidden_states"])

    def _output_taker(self, i: int):
        def hook(_module, _args, output) -> None:
            self._add(i, _block_output(output))

        return hook

    def _keep_last_block_output(self, _module, _args, output) -> None:
        self._last_block_output = _block_output(output)


def _block_output(output: Any) -> torch.Tensor:
    """A block's hidden-state output (some families return a tuple that starts with it)."""
    return output[0] if isinstance(output, tuple) else output


def score_model(
    model: torch.nn.Module,
    tokens: ProbeTokens,
    *,
    config: ScoreConfig = ScoreConfig(),
    progress: Callable[[int, int], None] | bool = False,
    maps: dict[int, LinearMap] | None = None,
    device: torch.device | None = None,
) -> tuple[Scores, int]:
    """Run the probe through a loaded base model and score every block; (scores, passes).

    With ``maps`` (a dict), also fit every pair's affine map into it (pair index → map).
    ``device``: where the inputs and statistics go (default: the first parameter's)."""
    device = device or next(model.parameters()).device
    d = model.config.hidden_size
    blocks = find_blocks(model)
    warnings = check_token_count(tokens.n_tokens, d, config.engine)
    groups = _layer_groups(len(blocks) + 1, d, config.stats_memory_budget, device)

    ids = torch.tensor(tokens.input_ids, dtype=torch.long)
    attn = torch.tensor(tokens.attention_mask, dtype=torch.long)
    keep = torch.tensor(tokens.score_mask, dtype=torch.bool)
    bs = _sequences_per_batch(tokens, config.batch_size, device)
    batches = [slice(s, s + bs) for s in range(0, ids.shape[0], bs)]

    pairs: list[PairScores] = []
    layers: list[LayerScores] = []
    done = 0
    with _progress_reporter(progress, len(groups) * tokens.n_tokens) as report:
        for first, last in groups:
            stats = StreamingStats(d, first, last, device=device, gemm_precision=config.engine.gemm_precision)
            with HiddenStateTap(blocks, stats) as tap, _first_blocks_only(blocks, tap.blocks_needed):
                for b in batches:
                    tap.start_batch(keep[b].to(device))
                    with ckpt.translate_oom(
                        "running the forward pass",
                        "Lower --batch-size or --seq-len, or use --dtype bfloat16.",
                    ), torch.inference_mode():
                        out = model(
                            input_ids=ids[b].to(device),
                            attention_mask=_mask_or_none(attn[b], device),
                            use_cache=False,
                        )
                        tap.end_batch(out)
                    done += int(keep[b].sum())
                    report(done)
            with ckpt.translate_oom("solving the statistics", "Set a smaller stats memory budget."):
                group_pairs, group_layers = stats.scores(config.engine, fit_maps=maps is not None)
            group_pairs[-1].final_norm = bool(tap.final_norm)
            if maps is not None:
                maps.update(stats.maps)
            pairs += group_pairs
            # consecutive groups share a hidden state, scored in both: keep the first score
            layers += [s for s in group_layers if not layers or s.layer > layers[-1].layer]
            del stats, tap  # free this group's statistics before the next group's are allocated
    n = tokens.n_tokens
    return (
        Scores(n_tokens=n, d=d, chance=d / (n - 1), pairs=pairs, layers=layers, warnings=warnings),
        len(groups),
    )


def _passes(n_sequences: int, per_pass: int | None) -> list[range]:
    per_pass = per_pass or n_sequences
    return [range(s, min(s + per_pass, n_sequences)) for s in range(0, n_sequences, per_pass)]


def score_blockwise(
    runner: BlockRunner,
    tokens: ProbeTokens,
    *,
    config: ScoreConfig = ScoreConfig(),
    sequences_per_pass: int | None = None,
    hidden_on_host: bool = False,
    progress: Callable[[int, int], None] | bool = False,
    maps: dict[int, LinearMap] | None = None,
) -> tuple[Scores, int]:
    """``score_model`` block-major, for a streamed model: a pass takes its sequences (all, or
    ``sequences_per_pass``) through block 0 batch by batch, then through block 1, and so on,
    so each block's weights are loaded once per pass. The statistics see the same batches in
    the same order with the same values as ``score_model``'s: the scores are the same.
    Returns (scores, forward passes over the probe)."""
    device = runner.device
    d = runner.model.config.hidden_size
    n_blocks = runner.n_blocks
    warnings = check_token_count(tokens.n_tokens, d, config.engine)
    groups = _layer_groups(n_blocks + 1, d, config.stats_memory_budget, device)
    ids = torch.tensor(tokens.input_ids, dtype=torch.long)
    attn = torch.tensor(tokens.attention_mask, dtype=torch.long)
    keep = torch.tensor(tokens.score_mask, dtype=torch.bool)
    bs = _sequences_per_batch(tokens, config.batch_size, device)
    passes = _passes(ids.shape[0], sequences_per_pass)
    store = torch.device("cpu") if hidden_on_host else device

    pairs: list[PairScores] = []
    layers: list[LayerScores] = []
    work = sum(min(last, n_blocks) for _, last in groups) * tokens.n_tokens
    done = 0
    with _progress_reporter(progress, work) as report, torch.inference_mode():
        for first, last in groups:
            stats = StreamingStats(d, first, last, device=device, gemm_precision=config.engine.gemm_precision)
            final_norm: bool | None = None
            run = min(last, n_blocks)  # blocks 0 … run − 1 produce hidden states first … last
            for p in passes:
                batches = [slice(s, min(s + bs, p.stop)) for s in range(p.start, p.stop, bs)]
                kept = [keep[b].to(device) for b in batches]
                masks = [_mask_or_none(attn[b], device) for b in batches]
                hs, calls = [], []
                for k, b in enumerate(batches):
                    h, call = runner.embed(ids[b], masks[k])
                    if first == 0:
                        stats.fold(0, h[kept[k]])
                    hs.append(h.to(store))
                    calls.append(call)
                runner.release_outside()  # the embeddings: not needed again this pass
                runner.prepare(list(range(run)))
                for i in range(run):
                    with runner.weights(i), ckpt.translate_oom(
                            "running a block", "Lower --batch-size or --seq-len, or LAYERTRACK_MAX_MEMORY."):
                        for k, b in enumerate(batches):
                            x = hs[k].to(device)
                            y = runner.block(i, x, calls[k])
                            if i + 1 < n_blocks:
                                if first <= i + 1 <= last:
                                    stats.fold(i + 1, y[kept[k]], x[kept[k]] if i + 1 > first else None)
                            else:  # the last block: h_L is the model's output (final norm applied)
                                h_last = runner.tail(y, ids[b], masks[k], calls[k]).last_hidden_state
                                if final_norm is None:
                                    final_norm = not torch.equal(y, h_last)
                                stats.fold(n_blocks, h_last[kept[k]], x[kept[k]] if n_blocks > first else None)
                            hs[k] = y.to(store)
                            del x, y
                            done += int(kept[k].sum())
                            report(done)
                del hs, calls
                runner.release_outside()  # the final norm
            with ckpt.translate_oom("solving the statistics", "Set a smaller stats memory budget."):
                group_pairs, group_layers = stats.scores(config.engine, fit_maps=maps is not None)
            group_pairs[-1].final_norm = bool(final_norm)
            if maps is not None:
                maps.update(stats.maps)
            pairs += group_pairs
            layers += [s for s in group_layers if not layers or s.layer > layers[-1].layer]
            del stats
    n = tokens.n_tokens
    return (
        Scores(n_tokens=n, d=d, chance=d / (n - 1), pairs=pairs, layers=layers, warnings=warnings),
        len(groups) * len(passes),
    )


def lm_loss(lm: torch.nn.Module, tokens: ProbeTokens, *, batch_size: int | None = None) -> float:
    """Mean next-token cross-entropy (nats) of a causal LM over the tokens' real positions."""
    device = next(lm.parameters()).device
    ids = torch.tensor(tokens.input_ids, dtype=torch.long)
    attn = torch.tensor(tokens.attention_mask, dtype=torch.long)
    bs = _sequences_per_batch(tokens, batch_size, device)
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, ids.shape[0], bs):
            b_ids, b_attn = ids[s:s + bs], attn[s:s + bs]
            labels = b_ids.masked_fill(b_attn == 0, -100)
            out = lm(input_ids=b_ids.to(device), attention_mask=_mask_or_none(b_attn, device),
                     labels=labels.to(device), use_cache=False)
            n = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    return total / count


def replaceability(
    runner: BlockRunner, maps: dict[int, LinearMap], holdout: ProbeTokens, *, final_norm: bool,
    batch_size: int | None = None, progress: Callable[[int, int], None] | bool = False,
) -> tuple[float, dict[int, tuple[float | None, float]]]:
    """The pruning experiment of "Your Transformer is Secretly Linear" (arXiv 2405.12250) on
    held-out tokens: for each block i, the LM loss with the block replaced by its fitted
    affine map (``maps[i]``), and with the block dropped (its output := its input), minus the
    intact loss. Returns (intact loss, {i: (linear, drop)}). The last block's pair ends in
    the final norm when ``final_norm``: its fitted map is not a map of the block alone, so
    only the drop is measured there (linear: None).

    ``runner`` runs a causal LM (resident or streamed). The intact pass goes block by block
    and keeps the hidden state entering block i; the two variants start from it and run only
    blocks i + 1 … L − 1 and the head. That is L·(L + 1) block runs per batch instead of the
    2·L² of two whole forward passes per block."""
    device = runner.device
    n_blocks = runner.n_blocks
    ids = torch.tensor(holdout.input_ids, dtype=torch.long)
    attn = torch.tensor(holdout.attention_mask, dtype=torch.long)
    bs = _sequences_per_batch(holdout, batch_size, device)
    batches = [slice(s, s + bs) for s in range(0, ids.shape[0], bs)]
    masks = [_mask_or_none(attn[b], device) for b in batches]
    labels = [ids[b].masked_fill(attn[b] == 0, -100) for b in batches]
    counts = [int((lab[:, 1:] != -100).sum()) for lab in labels]

    def loss(outputs: list[torch.Tensor], calls: list) -> float:
        total = 0.0
        for k, b in enumerate(batches):
            out = runner.tail(outputs[k], ids[b], masks[k], calls[k], labels=labels[k].to(device))
            total += float(out.loss) * counts[k]
        return total / sum(counts)

    order = [j for i in range(n_blocks) for j in range(i, n_blocks)]
    deltas: dict[int, tuple[float | None, float]] = {}
    raw: dict[int, tuple[float | None, float]] = {}
    with _progress_reporter(progress, len(order)) as report, torch.inference_mode():
        hs, calls = [], []
        for k, b in enumerate(batches):
            h, call = runner.embed(ids[b], masks[k])
            hs.append(h)
            calls.append(call)
        runner.prepare(order)
        base = float("nan")
        steps = 0
        for i in range(n_blocks):
            with runner.weights(i):
                nxt = [runner.block(i, h, calls[k]) for k, h in enumerate(hs)]
            steps += 1
            report(steps)
            if i == n_blocks - 1:
                base = loss(nxt, calls)
            fitted = maps.get(i)
            linear_too = fitted is not None and not (final_norm and i == n_blocks - 1)
            variants = [list(hs)] + ([[fitted(h) for h in hs]] if linear_too else [])
            for j in range(i + 1, n_blocks):
                with runner.weights(j):
                    variants = [[runner.block(j, h, calls[k]) for k, h in enumerate(v)] for v in variants]
                steps += 1
                report(steps)
            losses = [loss(v, calls) for v in variants]
            raw[i] = (losses[1] if linear_too else None, losses[0])
            del variants
            hs = nxt
    for i, (linear, drop) in raw.items():
        deltas[i] = (None if linear is None else linear - base, drop - base)
    return base, deltas


def holdout_tokens(probe: Probe, tokenizer: Any, *, used: ProbeTokens, n_tokens: int, seed: int) -> tuple[
        ProbeTokens, list[str]]:
    """Probe sequences after the scored ones (the same cut), about ``n_tokens`` of them."""
    every = tokenize_probe(probe, tokenizer, max_tokens=None, seq_len=used.seq_len, seed=seed)
    n_used, n_all = len(used.input_ids), len(every.input_ids)
    want = max(1, -(-n_tokens // used.seq_len))
    warnings = []
    if n_all - n_used >= 1:
        start, stop = n_used, min(n_all, n_used + want)
    else:
        start, stop = max(0, n_all - want), n_all
        warnings.append("the probe has no tokens left after the scored ones: the replaceability losses are "
                        "measured on scored tokens (lower --max-tokens to keep some held out)")
    sub = dataclasses.replace(
        every, input_ids=every.input_ids[start:stop], attention_mask=every.attention_mask[start:stop],
        score_mask=every.score_mask[start:stop], n_tokens=sum(map(sum, every.attention_mask[start:stop])),
    )
    return sub, warnings


def max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def memory_budget(device: torch.device, devices: list[torch.device] | None = None) -> int:
    """The default budget for weights and activations: DEFAULT_BUDGET_SHARE of what the
    device(s) have free now (CUDA: on the devices; CPU: MemAvailable)."""
    if device.type == "cuda":
        free = sum(torch.cuda.mem_get_info(d)[0] for d in (devices or [device]))
    else:
        free = 2 * _auto_stats_budget(device)
    return int(free * DEFAULT_BUDGET_SHARE)


def cuda_devices(device: torch.device, requested: str | None) -> list[torch.device]:
    """Every visible CUDA device when the job names none (or plain "cuda"); else just its own."""
    if device.type == "cuda" and requested in (None, "cuda") and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


@dataclass
class Prepared:
    """Everything known about a job before its weights are touched."""

    path: Path
    info: ckpt.CheckpointInfo
    probe: Probe
    tokenizer: Any
    device: torch.device
    devices: list[torch.device]
    dtype: torch.dtype
    hf_config: Any
    seq_len: int
    tokens: ProbeTokens
    warnings: list[str]
    headers: dict[str, tuple[dict, int]] | None
    plan: Plan
    shape: ModelShape | None
    #: a training framework's checkpoint (workers/formats/native.py); None for a transformers one
    native: Any = None


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def prepare(
    uri: str,
    *,
    probe: Probe | str | Path | None = None,
    config: ScoreConfig = ScoreConfig(),
    roots: list[str | Path] | None = None,
    tokenizer_path: str | Path | None = None,
    headers: dict[str, tuple[dict, int]] | None = None,
    format: str | None = None,
    model_config: str | Path | None = None,
) -> Prepared:
    """Check the checkpoint, tokenise the probe and plan the job's memory (nothing loaded).
    ``headers``: the safetensors headers when the weight files are still being fetched.
    ``format`` names the checkpoint's layout (default: ``config.format``, else detected;
    workers/formats/native.py), ``model_config`` gives the architecture of a framework
    checkpoint that carries none (default: ``config.model_config``), ``tokenizer_path`` the
    tokenizer (default: ``config.tokenizer``, else the checkpoint's own)."""
    from transformers import AutoConfig

    from .formats import native as formats

    format = format or config.format
    model_config = model_config or config.model_config
    tokenizer_path = tokenizer_path or config.tokenizer
    path = ckpt.resolve_checkpoint_path(uri, roots)
    pending = {f: start + max((t["data_offsets"][1] for n, t in h.items() if n != "__metadata__"), default=0)
               for f, (h, start) in (headers or {}).items()}
    native = None
    if headers is None and format != "hf" and (format is not None or formats.detect(path) != "hf"):
        native = formats.open_native(path, format=format, model_config=model_config)
        info = ckpt.CheckpointInfo(path=path, config=native.architecture, model_type=native.model_type,
                                   weights_format=native.format, weight_files=native.files,
                                   fingerprint=native.fingerprint())
    else:
        info = ckpt.inspect_checkpoint(path, allow_pickle=config.allow_pickle, pending=pending)
    if not isinstance(probe, Probe):
        probe = load_probe(probe)
    tokenizer = ckpt.load_tokenizer(path, tokenizer_path)
    device = ckpt.pick_device(config.device)
    devices = cuda_devices(device, config.device)
    dtype = ckpt.pick_dtype(config.dtype, device)
    if native is not None:
        arch = dict(native.architecture)
        hf_config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    else:
        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    d = hf_config.hidden_size
    seq_len = config.seq_len
    limit = max_positions(hf_config)
    warnings: list[str] = []
    if limit is not None and seq_len > limit:
        warnings.append(f"seq_len {seq_len} exceeds the model's {limit} positions; using {limit}")
        seq_len = limit
    max_tokens = config.max_tokens if config.max_tokens is not None else default_max_tokens(d)
    tokens = tokenize_probe(probe, tokenizer, max_tokens=max_tokens, seq_len=seq_len,
                            drop_first_token=config.drop_first_token, seed=config.seed)
    if tokens.n_tokens < max_tokens:
        warnings.append(
            f"the probe holds only {tokens.n_available} scorable tokens at seq_len {seq_len}; "
            f"scoring {tokens.n_tokens} instead of the {max_tokens} asked for"
        )
    if config.replaceability:
        n_fit = tokens.n_tokens
        if n_fit < REPLACEABILITY_TOKENS_PER_DIM * d:
            warnings.append(
                f"replaceability: the linear maps are fitted on {n_fit} tokens, {n_fit / d:.1f} per dimension "
                f"(d={d}); below {REPLACEABILITY_TOKENS_PER_DIM:g} per dimension a d×d map overfits and its "
                f"held-out loss is pessimistic (--max-tokens {math.ceil(REPLACEABILITY_TOKENS_PER_DIM * d)} "
                "or more)")
    budget = config.max_memory or memory_budget(device, devices)
    db = _dtype_bytes(dtype)
    batch = _sequences_per_batch(tokens, config.batch_size, device)
    n_seq = len(tokens.input_ids)
    stats = _group_stats_bytes(hf_config.num_hidden_layers + 1, d, config.stats_memory_budget, device)
    shape = None
    if info.weights_format == "safetensors":
        if headers is None:
            headers = {f: read_header(path / f) for f in info.weight_files}
        tensors = {n: (t["dtype"], t["shape"]) for h, _ in headers.values() for n, t in h.items()
                   if n != "__metadata__"}
        skip = () if config.replaceability or config.logit_lens else _head_names(tensors, hf_config)
        try:
            shape = model_shape(tensors, hf_config.to_dict(), dtype_bytes=db, skip=skip)
        except ValueError:  # tensor names not numbered by block: transformers maps (or refuses) them
            shape = None
    if native is not None:
        size = native.n_elements * db  # the model in the job's dtype
        if config.execution == "streamed" or size > budget:
            raise FormatUnsupported(
                f"the {native.format} checkpoint {str(path)!r} ({size / 2**20:.0f} MiB of weights in {dtype}) "
                + ("is to be scored streamed" if config.execution == "streamed" else
                   f"does not fit the memory budget of {budget / 2**20:.0f} MiB")
                + f": streamed execution does not read {native.format} checkpoints yet; score it resident "
                "(--execution resident, with --max-memory at least the weights' size)")
        plan = Plan(mode="resident", passes=1, sequences_per_pass=n_seq, batch_sequences=batch,
                    hidden_states="device", prefetch=False, budget=budget, weight_bytes=size, peak_bytes=size,
                    stats_bytes=stats, devices=tuple(str(x) for x in devices))
    elif shape is not None:
        plan = plan_memory(shape, dtype_bytes=db, n_sequences=n_seq, seq_len=seq_len, batch_sequences=batch,
                           budget=budget, stats_bytes=stats, device_type=device.type,
                           devices=tuple(str(x) for x in devices), force=config.execution)
    else:  # pickle weights, or tensors the planner cannot place in blocks: loaded whole
        size = sum((path / f).stat().st_size if f not in pending else pending[f] for f in info.weight_files)
        plan = Plan(mode="resident", passes=1, sequences_per_pass=n_seq, batch_sequences=batch,
                    hidden_states="device", prefetch=False, budget=budget, weight_bytes=size, peak_bytes=size,
                    stats_bytes=stats, devices=tuple(str(x) for x in devices))
    return Prepared(path=path, info=info, probe=probe, tokenizer=tokenizer, device=device, devices=devices,
                    dtype=dtype, hf_config=hf_config, seq_len=seq_len, tokens=tokens, warnings=warnings,
                    headers=headers, plan=plan, shape=shape, native=native)


def _group_stats_bytes(n_hidden: int, d: int, budget: int | None, device: torch.device) -> int:
    """Bytes of the largest statistics group the job will hold."""
    try:
        groups = _layer_groups(n_hidden, d, budget, device)
    except OutOfMemory:
        return stats_bytes(2, d)
    return max(stats_bytes(last - first + 1, d) for first, last in groups)


def _head_names(tensors: dict[str, Any], hf_config: Any) -> tuple[str, ...]:
    """Names of the LM head's tensors (left out when only the base model is loaded)."""
    return tuple(n for n in ("lm_head.", "embed_out.", "output.") if any(t.startswith(n) for t in tensors))


def _device_map(prep: Prepared) -> tuple[str, dict[int, int]] | None:
    """Resident on several GPUs: accelerate's "auto" placement (blocks in order across the
    devices) within each device's share of the budget, in proportion to its free memory."""
    if len(prep.devices) < 2:
        return None
    free = [torch.cuda.mem_get_info(d)[0] for d in prep.devices]
    total = sum(free)
    return "auto", {d.index: int(prep.plan.budget * f / total) for d, f in zip(prep.devices, free, strict=True)}


def score_checkpoint(
    uri: str,
    *,
    probe: Probe | str | Path | None = None,
    config: ScoreConfig = ScoreConfig(),
    roots: list[str | Path] | None = None,
    tokenizer_path: str | Path | None = None,
    progress: Callable[[int, int], None] | bool = False,
    headers: dict[str, tuple[dict, int]] | None = None,
    ready: Callable[[str], None] | None = None,
    expect_fingerprint: str | None = None,
    format: str | None = None,
    model_config: str | Path | None = None,
) -> ScoreResult:
    """Score every block of the checkpoint at ``uri`` on the probe (default: built-in).

    The memory plan decides resident or streamed execution (``prepare``). ``headers`` and
    ``ready`` let weights be scored while they are still being fetched: ``ready(file)``
    returns once ``file`` is complete (the job then runs streamed, in the order of its
    blocks). ``expect_fingerprint``: the identity the checkpoint had when it was submitted
    (``CheckpointInfo.fingerprint``); CheckpointChanged when it is no longer that one, before
    scoring or (for a checkpoint on disk) once scored. ``format`` and ``model_config``: see
    :func:`prepare`."""
    t0 = time.perf_counter()
    prep = prepare(uri, probe=probe, config=config, roots=roots, tokenizer_path=tokenizer_path, headers=headers,
                   format=format, model_config=model_config)
    plan, tokens, device, dtype, info = prep.plan, prep.tokens, prep.device, prep.dtype, prep.info
    if expect_fingerprint is not None and info.fingerprint != expect_fingerprint:
        raise CheckpointChanged(f"checkpoint {uri} changed after it was submitted (its files were written again): "
                                "these are not the bytes the job was accepted for; submit it again")
    streamed = plan.mode == "streamed" or (ready is not None and prep.shape is not None)
    keep = False
    if ready is not None and not streamed:  # loaded whole: every file first
        for f in info.weight_files:
            ready(f)
    runner: BlockRunner | None = None
    lm = None
    head = config.replaceability or config.logit_lens  # the LM head is loaded
    if streamed:
        # a resident plan for weights still arriving: each module reads its weights when it
        # first runs and keeps them, and the job runs batch by batch as resident ones do
        keep = plan.mode == "resident"
        source = WeightSource(prep.path, prep.headers or {}, ready=ready)
        streamed_model = build_streamed(prep.path, source, with_lm_head=head, device=device,
                                        dtype=dtype, prefetch=plan.prefetch, find_blocks=find_blocks, keep=keep)
        runner = streamed_model
        base = streamed_model.model.base_model if head else streamed_model.model
        base_runner = runner.view(base)
        if keep:
            model = base
    elif prep.native is not None:
        from .formats.native import build_model

        with ckpt.translate_oom(f"loading {str(prep.path)!r}",
                                "Use a smaller --dtype (bfloat16), a machine with more memory, or free memory first."):
            lm = build_model(prep.native, device=device, dtype=dtype, with_lm_head=True) if head \
                else None
            model = lm.base_model if lm is not None else build_model(prep.native, device=device, dtype=dtype)
    else:
        placement = _device_map(prep)
        lm = ckpt.load_model(info, device=device, dtype=dtype, with_lm_head=True,
                             placement=placement) if head else None
        model = lm.base_model if lm is not None else ckpt.load_model(info, device=device, dtype=dtype,
                                                                     placement=placement)
    t_load = time.perf_counter()
    warnings = list(prep.warnings)
    maps: dict[int, LinearMap] | None = {} if config.replaceability else None
    try:
        if streamed and not keep:
            scores, n_passes = score_blockwise(base_runner, tokens, config=config, progress=progress, maps=maps,
                                               sequences_per_pass=plan.sequences_per_pass,
                                               hidden_on_host=plan.hidden_states == "host")
        else:
            scores, n_passes = score_model(model, tokens, config=config, progress=progress, maps=maps, device=device)
        t_scored = time.perf_counter()
        holdout = None
        if config.replaceability:
            held, held_warnings = holdout_tokens(prep.probe, prep.tokenizer, used=tokens,
                                                 n_tokens=config.holdout_tokens, seed=config.seed)
            warnings += held_warnings
            if runner is None:
                runner = BlockRunner(lm, find_blocks(lm), device)
            with ckpt.translate_oom("measuring replaceability", "Lower holdout_tokens or --batch-size."):
                base_loss, deltas = replaceability(runner, maps, held, final_norm=scores.pairs[-1].final_norm,
                                                   batch_size=config.batch_size)
            for p in scores.pairs:
                p.loss_delta_linear, p.loss_delta_drop = deltas[p.layer]
            holdout = {"n_tokens": held.n_tokens, "intact_loss": base_loss}
        t_lens = time.perf_counter()
        if config.logit_lens:
            if streamed and not keep:
                lens_absent = ("logit_lens_loss is measured on resident models; this one was streamed (it exceeds the "
                               "memory budget)")
                warnings.append(lens_absent)
            else:
                if runner is None:
                    runner = BlockRunner(lm, find_blocks(lm), device)
                with ckpt.translate_oom("measuring the logit lens", "Lower --batch-size or --seq-len."):
                    for layer, loss in zip(scores.layers, logit_lens(runner, tokens, batch_size=config.batch_size,
                                                                     device=device), strict=True):
                        layer.logit_lens_loss = loss
        t_lens = time.perf_counter() - t_lens
    finally:
        if streamed:
            streamed_model.close()
    if expect_fingerprint is not None and headers is None:  # on disk all along: the same bytes to the end?
        again = prep.native.fingerprint() if prep.native is not None else ckpt.inspect_checkpoint(
            prep.path, allow_pickle=config.allow_pickle, check_causal_lm=False).fingerprint
        if again != info.fingerprint:
            raise CheckpointChanged(f"checkpoint {uri} changed while it was being scored (its files were written "
                                    "again): its scores would mix two versions; submit it again once written")
    wanted = config.dynamics is not False and (config.compare_to is not None or config.dynamics)
    if wanted and prep.native is not None:  # absent with its reason, never a failed job
        reason = f"weight_update between {prep.native.format} checkpoints is not measured yet"
        dynamics = {"absent": reason}
        warnings.append(reason)
    else:
        dynamics = _weight_updates(prep.path, scores, config, roots) if wanted else None
        if dynamics is not None and "absent" not in dynamics:
            t_drift = time.perf_counter()
            why = _drift(model if not (streamed and not keep) else None, prep, config, roots, scores, device, dtype)
            dynamics["drift_cka"] = ({"absent": why} if why else
                                     {"seconds": round(time.perf_counter() - t_drift, 3)})
    t_done = time.perf_counter()
    scores.warnings = warnings + scores.warnings
    return ScoreResult(
        scores=scores,
        model_type=info.model_type,
        n_layers=len(scores.pairs),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        seq_len=prep.seq_len,
        n_sequences=len(tokens.input_ids),
        n_passes=n_passes,
        probe_name=prep.probe.name,
        probe_sha256=prep.probe.sha256,
        tokenizer_fingerprint=tokens.tokenizer_fingerprint,
        checkpoint_fingerprint=info.fingerprint,
        holdout=holdout,
        dynamics=dynamics,
        plan={**plan.to_dict(), "mode": "streamed" if streamed and not keep else "resident",
              **({"loaded": "as the blocks first run"} if streamed and keep else {})},
        timings={
            "load_s": t_load - t0,
            "score_s": t_scored - t_load,
            **({"replaceability_s": t_done - t_scored - (t_lens if config.logit_lens else 0.0)}
               if config.replaceability else {}),
            **({"logit_lens_s": t_lens} if config.logit_lens else {}),
            "total_s": t_done - t0,
        },
    )


def logit_lens(runner: BlockRunner, tokens: ProbeTokens, *, batch_size: int | None = None,
               device: torch.device | None = None) -> list[float]:
    """logit_lens_loss of every hidden state h_0 … h_L: the mean next-token cross-entropy
    (nats/token; per token in float32 or the logits' wider dtype, summed in float64) when
    h_i is decoded through the model's final norm and LM head, over the scored tokens whose
    next token is in the same sequence (a scored position t predicts token t + 1). h_i for
    i < L is the input of block i (h_0 the embeddings); it is given to the model's tail as
    if the last block had returned it (``BlockRunner.tail``: the final norm, then the head),
    so the decoding is the model's own. h_L is decoded as the model decodes its last block's
    output: its logits. The runner's model has the LM head."""
    device = device or runner.device
    ids = torch.tensor(tokens.input_ids, dtype=torch.long)
    attn = torch.tensor(tokens.attention_mask, dtype=torch.long)
    keep = torch.tensor(tokens.score_mask, dtype=torch.bool)
    # a scored position whose next token exists: its target is that token
    scored = keep[:, :-1] & attn[:, 1:].bool()
    bs = _sequences_per_batch(tokens, batch_size, device)
    n_hidden = runner.n_blocks + 1
    sums, count = [0.0] * n_hidden, 0
    for start in range(0, ids.shape[0], bs):
        b = slice(start, start + bs)
        mask = scored[b]
        if not bool(mask.any()):
            continue
        input_ids, am = ids[b].to(device), _mask_or_none(attn[b], device)
        target = ids[b][:, 1:][mask].to(device)
        with torch.inference_mode():
            h, call = runner.embed(input_ids, am)
            states = [h]
            for i in range(runner.n_blocks):
                with runner.weights(i):
                    h = runner.block(i, h, call)
                states.append(h)
            for i, state in enumerate(states):
                logits = runner.tail(state, input_ids, am, call).logits
                picked = logits[:, :-1][mask.to(logits.device)]
                # each token's loss in the logits' precision (at least float32: log-softmax is
                # stable there), summed in float64; a float64 copy of n × V logits is not made
                if picked.dtype in (torch.float16, torch.bfloat16):
                    picked = picked.float()
                per_token = torch.nn.functional.cross_entropy(picked, target.to(logits.device), reduction="none")
                sums[i] += float(per_token.to(torch.float64).sum())
        count += int(mask.sum())
    return [s / count if count else float("nan") for s in sums]


def _drift(model, prep: Prepared, config: ScoreConfig, roots, scores: Scores, device, dtype) -> str | None:
    """drift_cka of every hidden state against ``config.compare_to``, set on ``scores.layers``;
    None, or why it is absent (the job's other scores stand).

    Both models run resident on the same batches of the probe (the earlier one loaded beside
    this one, in the same dtype): per batch, each model's hidden states (``output_hidden_states``,
    h_0 … h_L as the engine defines them) over the scored tokens go into
    :class:`~.dynamics.DriftStats` (float64 cross- and auto-Grams), so no hidden state is kept
    past its batch. When the Grams of every hidden state do not fit the statistics budget, the
    hidden states are taken in groups, one pass over both models each."""
    from .dynamics import DriftStats

    if model is None:
        return "drift_cka runs both checkpoints resident; this job's model was streamed (it exceeds the memory budget)"
    earlier_path = ckpt.resolve_checkpoint_path(config.compare_to, roots)
    earlier_info = ckpt.inspect_checkpoint(earlier_path, allow_pickle=config.allow_pickle, check_causal_lm=False)
    tokens = prep.tokens
    d = model.config.hidden_size
    n_hidden = len(scores.layers)
    bs = _sequences_per_batch(tokens, config.batch_size, device)
    # this job's peak, the earlier model's weights (the same architecture: the same bytes in
    # this dtype), and a batch's hidden states of both models, kept whole for the batch
    hidden = 2 * n_hidden * bs * prep.seq_len * d * torch.empty((), dtype=dtype).element_size()
    need = prep.plan.peak_bytes + prep.plan.weight_bytes + hidden
    if need > prep.plan.budget:
        return (f"drift_cka runs both checkpoints resident: with the earlier one beside this one the job needs about "
                f"{need / 2**30:.2f} GiB, over the budget of {prep.plan.budget / 2**30:.2f} GiB")
    with ckpt.translate_oom(f"loading the earlier checkpoint {str(earlier_path)!r} for drift_cka",
                            "Use a smaller --dtype (bfloat16), or measure dynamics on a machine with more memory."):
        earlier = ckpt.load_model(earlier_info, device=device, dtype=dtype)
    try:
        if earlier.config.hidden_size != d:
            return (f"the earlier checkpoint's hidden size is {earlier.config.hidden_size}, this one's {d}: drift_cka "
                    "compares checkpoints of one architecture")
        budget = config.stats_memory_budget or _auto_stats_budget(device)
        per_group = max(1, min(n_hidden, budget // DriftStats.bytes(d, 1)))
        ids = torch.tensor(tokens.input_ids, dtype=torch.long)
        attn = torch.tensor(tokens.attention_mask, dtype=torch.long)
        keep = torch.tensor(tokens.score_mask, dtype=torch.bool)
        drift: list[float] = []
        for first in range(0, n_hidden, per_group):
            last = min(first + per_group, n_hidden)
            stats = DriftStats(d, last - first, device=device)
            for start in range(0, ids.shape[0], bs):
                b = slice(start, start + bs)
                kept = keep[b].to(device).reshape(-1)
                inputs = {"input_ids": ids[b].to(device), "attention_mask": _mask_or_none(attn[b], device),
                          "use_cache": False, "output_hidden_states": True}
                with ckpt.translate_oom("running both checkpoints for drift_cka",
                                        "Lower --batch-size or --seq-len."), torch.inference_mode():
                    hx = model(**inputs).hidden_states
                    hy = earlier(**inputs).hidden_states
                    if len(hx) != n_hidden or len(hy) != n_hidden:
                        return (f"the checkpoints have {len(hx)} and {len(hy)} hidden states: drift_cka compares "
                                "checkpoints of one architecture")
                    for i in range(first, last):
                        stats.add(i - first, hx[i].reshape(-1, d)[kept], hy[i].reshape(-1, d)[kept])
            drift += stats.drift()
    finally:
        del earlier
    for layer, value in zip(scores.layers, drift, strict=True):
        layer.drift_cka = value
    return None


def _weight_updates(path: Path, scores: Scores, config: ScoreConfig, roots) -> dict[str, Any]:
    """weight_update of every block against ``config.compare_to``, set on ``scores.pairs``; an
    earlier checkpoint that cannot be read or compared leaves it absent, with the reason (the
    job's own scores stand)."""
    from .dynamics import weight_updates

    if config.compare_to is None:
        return {"absent": "no earlier checkpoint to compare with (the run has no scored step before this one)"}
    try:
        earlier = ckpt.resolve_checkpoint_path(config.compare_to, roots)
        updates = {u.block: u for u in weight_updates(path, earlier)}
    except CheckpointError as e:
        return {"absent": f"the earlier checkpoint {config.compare_to} could not be compared ({e.code}): {e.message}"}
    for p in scores.pairs:
        u = updates.get(p.layer)
        p.weight_update = None if u is None else u.weight_update
    return {"compared_to": config.compare_to,
            "weight_update_kinds": [{"block": b, **updates[b].kinds} for b in sorted(updates)]}


__all__ = ["ScoreConfig", "ScoreResult", "find_blocks", "prepare", "replaceability", "score_blockwise",
           "score_checkpoint", "score_model"]
