"""Files written by ``torch.save`` (its zip format): nanoGPT's ``ckpt.pt``, litgpt's
``lit_model.pth``, DeepSpeed's ``*_model_states.pt``, Megatron's ``common.pt``, Lightning's
``meta.pt``.

Such a file is a zip archive: ``<name>/data.pkl``, a pickle of the saved object in which every
tensor is a call that rebuilds it from a storage, and one entry ``<name>/data/<key>`` per
storage holding its raw elements, stored uncompressed. ``torch.load`` reads every storage; a
training checkpoint's optimizer state is most of its bytes. Here ``data.pkl`` goes through the
restricted unpickler of :mod:`.pickles` with the tensor-rebuilding call replaced by one that
records where the tensor's bytes lie, so the index of every tensor (name, dtype, shape,
stride, byte range) comes from the pickle and the zip's directory alone, and a tensor is read
by its byte range: the model's tensors without the optimizer's.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointUnreadable, FileTooLarge, FormatUnsupported, MalformedWeights
from .files import read_range
from .pickles import restricted_loads

#: the most bytes of ``data.pkl`` read (a 70B model's state dict with optimizer: a few MiB)
MAX_PICKLE_BYTES = 256 * 2**20
#: the classes a torch.save pickle of state dicts and plain values is made of (the tensor and
#: storage classes are replaced, see :data:`_STORAGE_DTYPES`); ``_codecs.encode`` is how
#: protocol 2 pickles ``bytes``
ALLOWED = frozenset({
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("_codecs", "encode"),
})
#: the typed-storage classes torch.save names, and their dtypes
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}

#: ``read(offset, length)``: ``length`` bytes of the file from ``offset``
ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a torch.save file lies."""

    name: str
    dtype: str  # torch's name: "float32", ...
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage: str  # the storage's key (tensors that share one, such as tied weights, share it)
    start: int  # the byte offset in the file of the tensor's first element
    span: int  # the bytes from ``start`` that hold all its elements

    @property
    def nbytes(self) -> int:
        import torch

        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class TorchSaveIndex:
    """Every tensor of the saved object by dotted path (``model.transformer.h.0.attn.c_attn.weight``),
    and the object itself with each tensor standing as its :class:`StoredTensor`."""

    tensors: dict[str, StoredTensor]
    tree: Any

    def under(self, prefix: str) -> dict[str, StoredTensor]:
        """The tensors whose paths start with ``prefix`` (e.g. ``"model."``), keyed without it."""
        return {name[len(prefix):]: t for name, t in self.tensors.items() if name.startswith(prefix)}

    def value(self, path: str) -> Any:
        """The plain value at a dotted path (``model_args``, ``iter_num``), or None."""
        node = self.tree
        for part in path.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _Lazy:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _Lazy(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_SUBSTITUTES: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RangeFile(io.RawIOBase):
    """A read-only, seekable file over a :data:`ReadAt` (for :mod:`zipfile`)."""

    def __init__(self, read_at: ReadAt, size: int):
        self._read_at, self._size, self._pos = read_at, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence] + offset
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        if n:
            buffer[:n] = self._read_at(self._pos, n)
            self._pos += n
        return n


def _malformed(shown: str, why: str) -> MalformedWeights:
    return MalformedWeights(f"{shown} is not a readable torch.save file ({why}); it is truncated or corrupt: "
                            "save it again, or copy it completely")


def local_reader(path: Path) -> tuple[ReadAt, int]:
    """A :data:`ReadAt` over a local file, and the file's size."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointUnreadable(f"{str(path)!r} cannot be read ({e.strerror or e})") from None
    return (lambda offset, length: read_range(path, offset, length)), size


def _walk(node: Any, prefix: str, found: dict[str, _Lazy]) -> Any:
    if isinstance(node, _Lazy):
        found[prefix] = node
        return node
    if isinstance(node, dict):
        return {k: _walk(v, f"{prefix}.{k}" if prefix else str(k), found) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_walk(v, f"{prefix}.{i}" if prefix else str(i), found) for i, v in enumerate(node))
    return node


def read_index(read_at: ReadAt, size: int, shown: str) -> TorchSaveIndex:
    """The index of a torch.save file, from its zip directory and its ``data.pkl``."""
    if read_at(0, min(4, size)) != b"PK\x03\x04":
        raise FormatUnsupported(f"{shown} is not in torch.save's zip format (torch < 1.6 wrote another one, which "
                                "layertrack does not read): load and save it again with a current torch")
    try:
        archive = zipfile.ZipFile(_RangeFile(read_at, size))
        infos = {i.filename: i for i in archive.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise _malformed(shown, f"its zip directory: {e}") from None
    pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise _malformed(shown, "it has no data.pkl")
    root = pickles[0].split("/", 1)[0]
    order = infos.get(f"{root}/byteorder")
    if order is not None and archive.read(order).strip() not in (b"little", b""):
        raise FormatUnsupported(f"{shown} was saved on a big-endian machine; load and save it again on this one")
    info = infos[pickles[0]]
    if info.file_size > MAX_PICKLE_BYTES:
        raise FileTooLarge(f"{shown}: its data.pkl is {info.file_size} bytes, over the {MAX_PICKLE_BYTES}-byte cap")

    def persistent(pid: Any) -> _Storage:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise _malformed(shown, f"a storage reference {str(pid)[:80]!r} is not torch.save's")
        return _Storage(str(pid[2]), pid[1].dtype, int(pid[4]))

    tree = restricted_loads(archive.read(info), ALLOWED, f"{shown} (data.pkl)", substitutes=_SUBSTITUTES,
                            persistent=persistent)
    lazies: dict[str, _Lazy] = {}
    tree = _walk(tree, "", lazies)
    import torch

    offsets: dict[str, tuple[int, int]] = {}
    tensors: dict[str, StoredTensor] = {}
    for name, lazy in lazies.items():
        key = lazy.storage.key
        if key not in offsets:
            entry = infos.get(f"{root}/data/{key}")
            if entry is None:
                raise _malformed(shown, f"storage {key} of {name!r} is missing")
            if entry.compress_type != zipfile.ZIP_STORED:
                raise FormatUnsupported(f"{shown}: storage {key} is compressed, which torch.save never does")
            head = read_at(entry.header_offset, 30)
            if head[:4] != b"PK\x03\x04":
                raise _malformed(shown, f"storage {key} has no local zip header")
            n, extra = struct.unpack("<HH", head[26:30])
            offsets[key] = (entry.header_offset + 30 + n + extra, entry.file_size)
        start, stored = offsets[key]
        itemsize = getattr(torch, lazy.storage.dtype).itemsize
        numel = math.prod(lazy.shape)
        span = 0 if numel == 0 else 1 + sum((s - 1) * st for s, st in zip(lazy.shape, lazy.stride, strict=True))
        if (len(lazy.stride) != len(lazy.shape) or min(lazy.stride, default=0) < 0 or lazy.offset < 0
                or (lazy.offset + span) * itemsize > stored or start + stored > size):
            raise _malformed(shown, f"tensor {name!r} lies outside its storage")
        tensors[name] = StoredTensor(name, lazy.storage.dtype, lazy.shape, lazy.stride, key,
                                     start + lazy.offset * itemsize, span * itemsize)
    tree = _replace(tree, {id(lz): tensors[n] for n, lz in lazies.items()})
    return TorchSaveIndex(tensors, tree)


def _replace(node: Any, by_id: dict[int, StoredTensor]) -> Any:
    if isinstance(node, _Lazy):
        return by_id[id(node)]
    if isinstance(node, dict):
        return {k: _replace(v, by_id) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_replace(v, by_id) for v in node)
    return node


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def read_tensor(t: StoredTensor, read_at: ReadAt):
    """The tensor, contiguous, from its byte range alone."""
    import torch

    dtype = getattr(torch, t.dtype)
    if t.span == 0:
        return torch.empty(t.shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(read_at(t.start, t.span)), dtype=dtype)
    if t.stride == _row_major(t.shape):
        return flat.reshape(t.shape)
    return flat.as_strided(t.shape, t.stride).contiguous()
