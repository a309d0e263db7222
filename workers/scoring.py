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
from .errors import OutOfMemory
from .probe import DEFAULT_SEED, Probe, ProbeTokens, load_probe, tokenize_probe
from .vocabulary import DEFAULT_HOLDOUT_TOKENS, DEFAULT_MIN_TOKENS, DEFAULT_SEQ_LEN, WARN_TOKENS_PER_DIM

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
    engine: EngineConfig = field(default_factory=EngineConfig)


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
        self.stats.add(i, h[self._keep])

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
) -> tuple[Scores, int]:
    """Run the probe through a loaded base model and score every block; (scores, passes).

    With ``maps`` (a dict), also fit every pair's affine map into it (pair index → map)."""
    device = next(model.parameters()).device
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
    lm: torch.nn.Module, maps: dict[int, LinearMap], holdout: ProbeTokens, *, final_norm: bool,
    batch_size: int | None = None,
) -> tuple[float, dict[int, tuple[float | None, float]]]:
    """The pruning experiment of "Your Transformer is Secretly Linear" (arXiv 2405.12250) on
    held-out tokens: for each block i, the LM loss with the block replaced by its fitted
    affine map (``maps[i]``), and with the block dropped (its output := its input), minus the
    intact loss. Returns (intact loss, {i: (linear, drop)}). The last block's pair ends in
    the final norm when ``final_norm``: its fitted map is not a map of the block alone, so
    only the drop is measured there (linear: None)."""
    blocks = find_blocks(lm)
    base = lm_loss(lm, holdout, batch_size=batch_size)

    def with_block(i: int, replace: Callable[[torch.Tensor], torch.Tensor]) -> float:
        def hook(_module, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            new = replace(h)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = blocks[i].register_forward_hook(hook, with_kwargs=True)
        try:
            return lm_loss(lm, holdout, batch_size=batch_size) - base
        finally:
            handle.remove()

    out: dict[int, tuple[float | None, float]] = {}
    for i in range(len(blocks)):
        drop = with_block(i, lambda h: h)
        fitted = maps.get(i)
        linear = None if fitted is None or (final_norm and i == len(blocks) - 1) else with_block(i, fitted)
        out[i] = (linear, drop)
    return base, out


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


def score_checkpoint(
    uri: str,
    *,
    probe: Probe | str | Path | None = None,
    config: ScoreConfig = ScoreConfig(),
    roots: list[str | Path] | None = None,
    tokenizer_path: str | Path | None = None,
    progress: Callable[[int, int], None] | bool = False,
) -> ScoreResult:
    """Score every block of the checkpoint at ``uri`` on the probe (default: built-in)."""
    t0 = time.perf_counter()
    path = ckpt.resolve_checkpoint_path(uri, roots)
    info = ckpt.inspect_checkpoint(path, allow_pickle=config.allow_pickle)
    if not isinstance(probe, Probe):
        probe = load_probe(probe)
    tokenizer = ckpt.load_tokenizer(path, tokenizer_path)
    device = ckpt.pick_device(config.device)
    dtype = ckpt.pick_dtype(config.dtype, device)
    lm = ckpt.load_model(info, device=device, dtype=dtype, with_lm_head=True) if config.replaceability else None
    model = lm.base_model if lm is not None else ckpt.load_model(info, device=device, dtype=dtype)
    t_load = time.perf_counter()

    d = model.config.hidden_size
    seq_len = config.seq_len
    limit = max_positions(model.config)
    warnings: list[str] = []
    if limit is not None and seq_len > limit:
        warnings.append(f"seq_len {seq_len} exceeds the model's {limit} positions; using {limit}")
        seq_len = limit
    max_tokens = config.max_tokens if config.max_tokens is not None else default_max_tokens(d)
    tokens = tokenize_probe(
        probe,
        tokenizer,
        max_tokens=max_tokens,
        seq_len=seq_len,
        drop_first_token=config.drop_first_token,
        seed=config.seed,
    )
    if tokens.n_tokens < max_tokens:
        warnings.append(
            f"the probe holds only {tokens.n_available} scorable tokens at seq_len {seq_len}; "
            f"scoring {tokens.n_tokens} instead of the {max_tokens} asked for"
        )
    t_tok = time.perf_counter()
    maps: dict[int, LinearMap] | None = {} if lm is not None else None
    scores, n_passes = score_model(model, tokens, config=config, progress=progress, maps=maps)
    t_scored = time.perf_counter()
    holdout = None
    if lm is not None:
        held, held_warnings = holdout_tokens(probe, tokenizer, used=tokens, n_tokens=config.holdout_tokens,
                                             seed=config.seed)
        warnings += held_warnings
        with ckpt.translate_oom("measuring replaceability", "Lower holdout_tokens or --batch-size."):
            base_loss, deltas = replaceability(lm, maps, held, final_norm=scores.pairs[-1].final_norm,
                                               batch_size=config.batch_size)
        for p in scores.pairs:
            p.loss_delta_linear, p.loss_delta_drop = deltas[p.layer]
        holdout = {"n_tokens": held.n_tokens, "intact_loss": base_loss}
    t_done = time.perf_counter()
    scores.warnings = warnings + scores.warnings
    return ScoreResult(
        scores=scores,
        model_type=info.model_type,
        n_layers=len(scores.pairs),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        seq_len=seq_len,
        n_sequences=len(tokens.input_ids),
        n_passes=n_passes,
        probe_name=probe.name,
        probe_sha256=probe.sha256,
        tokenizer_fingerprint=tokens.tokenizer_fingerprint,
        checkpoint_fingerprint=info.fingerprint,
        holdout=holdout,
        timings={
            "load_s": t_load - t0,
            "tokenize_s": t_tok - t_load,
            "score_s": t_scored - t_tok,
            **({"replaceability_s": t_done - t_scored} if lm is not None else {}),
            "total_s": t_done - t0,
        },
    )


__all__ = ["ScoreConfig", "ScoreResult", "find_blocks", "score_checkpoint", "score_model"]
