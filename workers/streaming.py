"""Running a model block by block: the machinery of streamed execution.

``BlockRunner`` runs a transformers model in three stages, using the model's own code for
each so that no family needs code of its own:

* ``embed``: the model's ``forward`` up to its first block, which catches its input and
  arguments (attention mask, position embeddings, ...) and stops the forward there;
* ``block``: one block's own ``forward`` on a hidden state, with those arguments;
* ``tail``: the model's ``forward`` again with every block replaced by a pass-through that
  hands over the last block's output, so the final norm (and the LM head and loss) run as
  the model defines them.

A streamed model (``StreamedModel``) is built on the ``meta`` device (accelerate's
``init_empty_weights``): no weight is in memory until it is needed. Each block's tensors
are read from the checkpoint's safetensors files just before the block runs (the next
block's while this one runs, on a thread) and given back after it (accelerate's
``set_module_tensor_to_device``); the tensors outside the blocks are read the first time
their module runs and given back when the stage that used them ends (``release_outside``:
the input embeddings after a pass's sequences are embedded, the final norm after the pass).
The tail stage runs without the input embeddings: their output there only feeds the
pass-through blocks, so it is replaced by zeros and their weights are not read. Tensors are
read with ``pread`` into memory of their own rather than through a memory map, so that the
process's resident memory holds what is in use and nothing of the page cache.

A resident model runs through the same ``BlockRunner`` (nothing to load), which is what the
replaceability measurement uses for both.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_safetensors
from .errors import MalformedWeights
from .planner import block_of, find_block_prefix

TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int


def tensor_table(headers: dict[str, tuple[dict, int]]) -> dict[str, TensorEntry]:
    """Tensor name → where it is, from each file's (safetensors header, data start)."""
    table: dict[str, TensorEntry] = {}
    for file, (header, start) in headers.items():
        for name, t in header.items():
            if name == "__metadata__":
                continue
            b, e = t["data_offsets"]
            table[name] = TensorEntry(file, t["dtype"], tuple(t["shape"]), start + b, start + e)
    return table


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and the offset of its data, framing checked
    (``checkpoint.check_safetensors``)."""
    return check_safetensors(path)


class WeightSource:
    """The tensors of a checkpoint directory, read on demand.

    ``ready(file)``, when given, is called before a file is first read and returns once the
    file is complete on disk (a fetch still in progress: see ``workers.remote``)."""

    def __init__(self, directory: Path, headers: dict[str, tuple[dict, int]],
                 ready: Callable[[str], None] | None = None):
        self.directory = Path(directory)
        self.table = tensor_table(headers)
        self._ready = ready
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        #: bytes read from the files (tests and benchmarks read it)
        self.bytes_read = 0

    def nbytes(self, name: str) -> int:
        e = self.table[name]
        return e.end - e.begin

    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, on the CPU in its stored dtype; read into ``out`` (a uint8 buffer of at
        least its size, aligned to its dtype) when given, else into new memory."""
        e = self.table[name]
        if self._ready is not None and e.file not in self._seen:
            self._ready(e.file)
            with self._lock:
                self._seen.add(e.file)
        dtype = TORCH_DTYPES.get(e.dtype)
        if dtype is None:
            raise MalformedWeights(f"tensor {name!r} of {e.file} has dtype {e.dtype}, which layertrack cannot read")
        out = torch.empty(e.end - e.begin, dtype=torch.uint8) if out is None else out[: e.end - e.begin]
        view = memoryview(out.numpy())
        fd = os.open(self.directory / e.file, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], e.begin + done)
                if n == 0:
                    raise MalformedWeights(f"{e.file} ended inside tensor {name!r} (truncated?)")
                done += n
        finally:
            os.close(fd)
        with self._lock:
            self.bytes_read += len(view)
        return out.view(dtype).reshape(e.shape)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def give_back_free_memory() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim``; a no-op elsewhere).

    glibc serves a large allocation with a mapping of its own, given back on free, but it
    raises that threshold to the size of each such block freed (up to 32 MiB); after that,
    block-sized tensors come from the heap, where freed memory stays in the process. Building
    a model allocates (without touching) every weight once before moving it to ``meta``; the
    heap then holds that much free space, which later allocations touch piece by piece."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class _Caught(Exception):
    """Raised by the catcher at block 0 to stop the model's forward there."""


class _Catcher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.args: tuple = ()
        self.kwargs: dict = {}

    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        raise _Caught


class _PassThrough(torch.nn.Module):
    """Stands in for a block in the tail stage: returns its input, or the given output."""

    def __init__(self, output: torch.Tensor | None = None):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        if self.output is not None:
            return self.output
        return args[0] if args else kwargs["hidden_states"]


@dataclass
class BlockCall:
    """How the model calls its blocks for one batch: the arguments after the hidden state."""

    args: tuple
    kwargs: dict
    hidden_in_args: bool
    returns_tuple: bool = False


def _without_hidden(args: tuple, kwargs: dict) -> BlockCall:
    if args:
        return BlockCall(args[1:], kwargs, True)
    kw = dict(kwargs)
    kw.pop("hidden_states")
    return BlockCall((), kw, False)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class BlockRunner:
    """Runs ``model`` (a transformers base model, or a causal LM around one) stage by stage;
    see the module doc. ``blocks`` is the model's block list."""

    def __init__(self, model: torch.nn.Module, blocks: torch.nn.ModuleList, device: torch.device,
                 block_devices: list[torch.device] | None = None):
        self.model, self.blocks, self.device = model, blocks, torch.device(device)
        self.n_blocks = len(blocks)
        self.block_devices = block_devices or [self.device] * self.n_blocks

    def view(self, model: torch.nn.Module) -> BlockRunner:
        """This runner with ``model`` as the one whose forward runs the stages (the base model
        inside a causal LM: the same blocks and weights, its own output)."""
        other = copy.copy(self)
        other.model = model
        return other

    @contextlib.contextmanager
    def weights(self, i: int) -> Iterator[None]:
        """Block ``i``'s weights on its device for the duration (resident: nothing to do)."""
        yield

    def prepare(self, order: list[int]) -> None:
        """The blocks about to run, in order (a streamed model reads ahead)."""

    def release_outside(self) -> None:
        """A stage has ended: give back the tensors outside the blocks (resident: nothing)."""

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, BlockCall]:
        """h_0 of a batch, and how the model calls its blocks for it."""
        catcher = _Catcher()
        first = self.blocks[0]
        self.blocks[0] = catcher
        try:
            self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask, use_cache=False)
        except _Caught:
            pass
        else:
            raise RuntimeError(f"{type(self.model).__name__} did not call its first block")
        finally:
            self.blocks[0] = first
        h = catcher.args[0] if catcher.args else catcher.kwargs["hidden_states"]
        return h, _without_hidden(catcher.args, catcher.kwargs)

    def block(self, i: int, h: torch.Tensor, call: BlockCall) -> torch.Tensor:
        """Block ``i``'s output for hidden state ``h`` (its weights must be present)."""
        device = self.block_devices[i]
        h = h.to(device)
        args, kwargs = (call.args, call.kwargs) if device == self.device else (
            _to_device(call.args, device), _to_device(call.kwargs, device))
        out = self.blocks[i](h, *args, **kwargs) if call.hidden_in_args else self.blocks[i](
            *args, hidden_states=h, **kwargs)
        if isinstance(out, tuple):
            call.returns_tuple = True
            out = out[0]
        return out

    def tail(self, last_output: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             call: BlockCall, **extra: Any) -> Any:
        """The model's output for a batch whose last block returned ``last_output``."""
        stand_ins = [_PassThrough() for _ in range(self.n_blocks)]
        out = last_output.to(self.device)
        stand_ins[-1].output = (out,) if call.returns_tuple else out
        saved = list(self.blocks)
        for k, s in enumerate(stand_ins):
            self.blocks[k] = s
        try:
            return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask, use_cache=False,
                              **extra)
        finally:
            for k, b in enumerate(saved):
                self.blocks[k] = b


def _named_tensors(module: torch.nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters(recurse=True)] + [
        n for n, _ in module.named_buffers(recurse=True)]


class StreamedModel(BlockRunner):
    """A model whose weights stay on disk until their block runs (module doc)."""

    def __init__(self, model: torch.nn.Module, blocks: torch.nn.ModuleList, source: WeightSource, *,
                 device: torch.device, dtype: torch.dtype, checkpoint_prefix: str, prefetch: bool = True,
                 block_devices: list[torch.device] | None = None, keep: bool = False):
        super().__init__(model, blocks, device, block_devices)
        #: every weight is read when its module first runs and kept: a resident model loaded
        #: as its blocks run (a remote job whose weights fit, scored while they arrive)
        self.keep = keep
        self.source, self.dtype, self.prefetch = source, dtype, prefetch
        self._root = model  # tensor names are relative to it (views run another model's forward)
        self._lock = threading.Lock()
        names = set(source.table)
        blocks_name = next(n for n, m in model.named_modules() if m is blocks)
        prefixes = ("", *tuple(dict.fromkeys(_prefix_candidates(model, checkpoint_prefix, blocks_name))))
        renamed = _renamed_keys(model, names)  # transformers' own renamings (GPT-NeoX's embed_out → lm_head)

        def key(model_name: str) -> str | None:
            for p in prefixes:
                if p + model_name in names:
                    return p + model_name
                if p + model_name in renamed:
                    return renamed[p + model_name]
            return None

        self._key = key
        self._blocks_name = blocks_name
        #: modules whose weights are not to be read when they run (the tail's input embeddings)
        self._skip: set[int] = set()
        # parameters and persistent buffers of each block, by their name in the model
        self.block_tensors: list[list[tuple[str, str]]] = []
        for i, b in enumerate(blocks):
            entries = []
            for n in _named_tensors(b):
                full = f"{blocks_name}.{i}.{n}"
                k = key(full)
                if k is None:
                    if _is_meta(model, full):
                        raise _missing(full)
                    continue  # a buffer computed at construction
                entries.append((full, k))
            self.block_tensors.append(entries)
        # everything else (with ``keep``: everything): read the first time its module runs, then kept
        inside = f"{blocks_name}."
        for mod_name, module in model.named_modules():
            if not keep and (mod_name == blocks_name or mod_name.startswith(inside)):
                continue
            own = [n for n, _ in module.named_parameters(recurse=False)] + [
                n for n, _ in module.named_buffers(recurse=False)]
            if own:
                module.register_forward_pre_hook(self._materialise_hook(mod_name))
        self._buffers_to_device()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="weights") if prefetch else None
        self._ahead: dict[int, Future] = {}
        self._order: deque[int] = deque()
        self._staging: list[torch.Tensor | None] = [None, None]
        self._slot = 1

    # ---------------------------------------------------------------- non-block tensors
    def _materialise_hook(self, mod_name: str):
        def hook(module, _args):
            if id(module) in self._skip:
                return
            for n, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if p.device.type != "meta":
                    continue
                full = f"{mod_name}.{n}" if mod_name else n
                k = self._key(full)
                if k is None:
                    tied = self._tied_value(full)
                    if tied is None:
                        raise _missing(full)
                    setattr(module, n, tied)
                    continue
                self._set(full, self.source.load(k), self.device)
        return hook

    def _tied_value(self, full: str) -> torch.nn.Parameter | None:
        """The input embeddings, for an LM head the checkpoint leaves out (tied weights)."""
        if not self._is_tied_head(full):
            return None
        emb = self._root.get_input_embeddings()
        if emb.weight.device.type == "meta":
            name = _name_of(self._root, emb) + ".weight"
            k = self._key(name)
            if k is None:
                return None
            self._set(name, self.source.load(k), self.device)
        return emb.weight

    def _is_tied_head(self, full: str) -> bool:
        """``full`` is the LM head's weight of a model whose head is tied to its input embeddings."""
        if not getattr(self._root.config, "tie_word_embeddings", False):
            return False
        getter = getattr(self._root, "get_output_embeddings", None)
        head = getter() if getter else None
        return head is not None and full == _name_of(self._root, head) + ".weight"

    def release_outside(self) -> None:
        """Give back every tensor outside the blocks that was read from the checkpoint (or tied
        to one); each is read again when its module next runs. Buffers computed at
        construction (rotary frequencies) stay."""
        if self.keep:
            return
        inside = f"{self._blocks_name}."
        freed = False
        for mod_name, module in self._root.named_modules():
            if mod_name == self._blocks_name or mod_name.startswith(inside):
                continue
            own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for n, t in own:
                full = f"{mod_name}.{n}" if mod_name else n
                if t.device.type == "meta" or (self._key(full) is None and not self._is_tied_head(full)):
                    continue
                self._free(full)
                freed = True
        if freed and self.device.type == "cpu":
            give_back_free_memory()

    def tail(self, last_output: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             call: BlockCall, **extra: Any) -> Any:
        if self.keep:
            return super().tail(last_output, input_ids, attention_mask, call, **extra)
        emb = self._root.get_input_embeddings()
        width = getattr(emb, "embedding_dim", None) or self._root.config.hidden_size

        def zeros(ids: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
            return torch.zeros((*ids.shape, width), dtype=self.dtype, device=self.device)

        emb.forward = zeros
        self._skip.add(id(emb))
        try:
            return super().tail(last_output, input_ids, attention_mask, call, **extra)
        finally:
            self._skip.discard(id(emb))
            del emb.forward

    def _buffers_to_device(self) -> None:
        """Buffers computed at construction (rotary frequencies, masks) go to the device."""
        for name, buf in list(self._root.named_buffers()):
            if buf.device.type != "meta" and buf.device != self.device:
                self._set(name, buf, self.device, keep_dtype=True)

    def _set(self, name: str, value: torch.Tensor, device: torch.device, keep_dtype: bool = False) -> None:
        from accelerate.utils import set_module_tensor_to_device

        dtype = None if keep_dtype or not value.is_floating_point() else self.dtype
        set_module_tensor_to_device(self._root, name, device, value=value, dtype=dtype, clear_cache=False)

    def _free(self, name: str) -> None:
        from accelerate.utils import set_module_tensor_to_device

        set_module_tensor_to_device(self._root, name, "meta", clear_cache=False)

    # ---------------------------------------------------------------- blocks
    def prepare(self, order: list[int]) -> None:
        if self.keep:
            return
        self._order.clear()  # in place: views of this runner share it
        self._order.extend(order)
        if self._order and self._pool is not None:
            self._read_ahead(self._order[0])

    def _read(self, i: int, slot: int) -> list[tuple[str, torch.Tensor]]:
        """Block ``i``'s tensors, read into staging buffer ``slot``: the same memory serves
        every block (no allocation, no page faults, nothing left to the allocator)."""
        spans, at = [], 0
        for _full, k in self.block_tensors[i]:
            spans.append(at)
            at += -(-self.source.nbytes(k) // 64) * 64  # 64-byte aligned: any dtype can view it
        buf = self._staging[slot]
        if buf is None or buf.numel() < at:
            buf = self._staging[slot] = torch.empty(at, dtype=torch.uint8)
        return [(full, self.source.load(k, out=buf[start:])) for (full, k), start in zip(
            self.block_tensors[i], spans, strict=True)]

    def _next_slot(self) -> int:
        """Staging buffers alternate when the next block is read while one runs."""
        if not self.prefetch:
            return 0
        self._slot = 1 - self._slot
        return self._slot

    def _read_ahead(self, i: int) -> None:
        if self._pool is not None and i not in self._ahead:
            self._ahead[i] = self._pool.submit(self._read, i, self._next_slot())

    @contextlib.contextmanager
    def weights(self, i: int) -> Iterator[None]:
        if self.keep:  # read by the modules' own hooks, and kept
            yield
            return
        fut = self._ahead.pop(i, None)
        tensors = fut.result() if fut is not None else self._read(i, self._next_slot())
        device = self.block_devices[i]
        for full, value in tensors:
            self._set(full, value, device)
        del tensors
        if self._order and self._order[0] == i:
            self._order.popleft()
            if self._order:
                self._read_ahead(self._order[0])
        try:
            yield
        finally:
            for full, _ in self.block_tensors[i]:
                self._free(full)
            if self.device.type == "cpu":
                give_back_free_memory()

    def close(self) -> None:
        for fut in self._ahead.values():
            fut.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _is_meta(model: torch.nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    t = getattr(model.get_submodule(module_name), attr)
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def _name_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _prefix_candidates(model: torch.nn.Module, checkpoint_prefix: str, blocks_name: str) -> list[str]:
    """Prefixes that turn a name in ``model`` into the checkpoint's name: the checkpoint's
    block list is ``checkpoint_prefix`` while the model's is ``blocks_name``; their
    difference is the base model's prefix (``model.`` of ``model.layers`` for a base model
    ``layers``), or its removal for a causal LM loaded from a base model's checkpoint."""
    out = []
    if checkpoint_prefix.endswith(blocks_name):
        out.append(checkpoint_prefix[: len(checkpoint_prefix) - len(blocks_name)])
    base = getattr(model, "base_model_prefix", "")
    if base:
        out.append(base + ".")
    return [p for p in out if p]


def _renamed_keys(model: torch.nn.Module, names: set[str]) -> dict[str, str]:
    """Checkpoint keys under the names transformers gives them on load (its checkpoint
    conversion mapping's plain renamings for this model), new name → key."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return {}
    rules = []
    for owner in (type(model).__name__, getattr(model.config, "model_type", "")):
        try:
            rules += get_checkpoint_conversion_mapping(owner) or []
        except Exception:
            continue
    out: dict[str, str] = {}
    for rule in rules:
        if type(rule).__name__ != "WeightRenaming":
            continue
        sources, targets = getattr(rule, "source_patterns", None), getattr(rule, "target_patterns", None)
        if isinstance(sources, str):
            sources = [sources]
        if isinstance(targets, str):
            targets = [targets]
        if not sources or not targets or len(targets) != 1:
            continue
        for src in sources:
            for name in names:
                new = re.sub(src, targets[0], name)
                if new != name:
                    out.setdefault(new, name)
    return out


def _missing(name: str) -> MalformedWeights:
    return MalformedWeights(
        f"the checkpoint has no tensor for {name!r}, which the model needs: its tensor names differ from "
        "the ones transformers writes (an older or converted checkpoint). Score it resident, which lets "
        "transformers map the names: raise LAYERTRACK_MAX_MEMORY (--max-memory) above its size")


def build_streamed(path: Path, source: WeightSource, *, with_lm_head: bool, device: torch.device,
                   dtype: torch.dtype, prefetch: bool, find_blocks: Callable[[torch.nn.Module], torch.nn.ModuleList],
                   block_devices: list[torch.device] | None = None, keep: bool = False) -> StreamedModel:
    """The model of checkpoint ``path`` with no weight loaded, ready to stream from ``source``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    with init_empty_weights(include_buffers=False):
        model = (AutoModelForCausalLM if with_lm_head else AutoModel).from_config(config, dtype=dtype)
    model.eval()
    give_back_free_memory()  # the weights allocated while the modules were built
    blocks = find_blocks(model)
    prefix = find_block_prefix(source.table, len(blocks))
    return StreamedModel(model, blocks, source, device=device, dtype=dtype, checkpoint_prefix=prefix,
                         prefetch=prefetch and not keep, block_devices=block_devices, keep=keep)


__all__ = ["BlockCall", "BlockRunner", "StreamedModel", "WeightSource", "block_of", "build_streamed",
           "read_header", "tensor_table"]
