"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` + ``__R_I.distcp``.

torchtitan, OLMo-core, Megatron-Core (``torch_dist``), Lightning's and accelerate's FSDP
sharded saves all write this layout. ``.metadata`` (a pickle, written last: its presence is
the commit marker) lists every entry of the saved state dict -- the model's tensors beside the
optimizer's, the scheduler's and the data loader's -- and, for each tensor, its chunks (the
part one rank held: offsets and sizes in the whole tensor) and where each chunk's bytes lie
(file, offset, length). Nothing but ``.metadata`` has to be read to know every tensor's dtype
and shape, and a tensor is read by reading its chunks' byte ranges only: a checkpoint with
optimizer state is read for its model tensors, a block for that block's chunks.

A chunk's bytes are either a ``torch.save`` archive of that chunk (DCP's default) or, where
the checkpoint was saved in DCP's raw serialisation, the chunk's elements in row-major order.
Archives are read with ``torch.load(weights_only=True)``; ``.metadata`` with the restricted
unpickler of :mod:`.pickles`, admitting the classes in :data:`ALLOWED` only.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FormatUnsupported, MalformedWeights, PickleRefused
from .files import read_range
from .pickles import restricted_loads

#: the commit marker: DCP writes it after every data file
METADATA = ".metadata"
#: the most bytes of ``.metadata`` read (a 70B model's, with optimizer state: a few MiB)
MAX_METADATA_BYTES = 256 * 2**20
#: what DCP's ``.metadata`` is made of (torch 2.x): the metadata dataclasses, the filesystem
#: storage's per-chunk record, torch.Size, the layout helper, and the path the checkpoint was
#: saved to (torch's dtypes are admitted by :mod:`.pickles` itself)
ALLOWED = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
})

#: ``read_range(file, offset, length)``: ``length`` bytes of ``file`` (relative to the
#: checkpoint directory) from ``offset``
ReadRange = Callable[[str, int, int], bytes]


@dataclass(frozen=True)
class Chunk:
    """One rank's part of a tensor: where it sits in the whole and where its bytes lie."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # torch's name: "float32", "bfloat16", ...
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        """The tensor's bytes in memory."""
        import torch

        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize

    @property
    def stored_bytes(self) -> int:
        """What reading it reads: its chunks' byte ranges."""
        return sum(c.length for c in self.chunks)


@dataclass(frozen=True)
class DcpIndex:
    """What ``.metadata`` says: every tensor of the saved state dict, and the other entries
    (plain values stored as pickled bytes: step counters, learning rates), never read."""

    tensors: dict[str, TensorEntry]
    others: tuple[str, ...]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(sorted({c.file for t in self.tensors.values() for c in t.chunks}))

    def under(self, prefix: str) -> dict[str, TensorEntry]:
        """The tensors whose names start with ``prefix`` (e.g. ``"model."``), keyed without it."""
        return {name[len(prefix):]: t for name, t in self.tensors.items() if name.startswith(prefix)}


def _malformed(shown: str, why: str) -> MalformedWeights:
    return MalformedWeights(f"{shown} is not a readable torch.distributed.checkpoint ({why}); it is truncated, "
                            "corrupt or still being written: wait for the save to finish, or copy it again")


def _ints(value: Any, shown: str, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise _malformed(shown, f"{what} is not a list of integers") from None
    if any(v < 0 for v in out):
        raise _malformed(shown, f"{what} has a negative entry")
    return out


def parse_metadata(raw: bytes, shown: str) -> DcpIndex:
    """The tensor index of a DCP checkpoint from the bytes of its ``.metadata``."""
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

    md = restricted_loads(raw, ALLOWED, shown)
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise _malformed(shown, f"it holds a {type(md).__name__}, not DCP's Metadata")
    storage = md.storage_data if isinstance(md.storage_data, dict) else {}
    where: dict[tuple[str, tuple[int, ...]], Any] = {}
    for key, info in storage.items():
        offsets = () if key.offset is None else _ints(key.offset, shown, f"the offset of {key.fqn!r}")
        where[(key.fqn, offsets)] = info
    tensors: dict[str, TensorEntry] = {}
    others: list[str] = []
    for name, entry in md.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            others.append(name)
            continue
        if not isinstance(entry, TensorStorageMetadata):
            raise _malformed(shown, f"entry {name!r} is a {type(entry).__name__}")
        dtype = entry.properties.dtype
        if not isinstance(dtype, torch.dtype):
            raise _malformed(shown, f"tensor {name!r} has no dtype")
        shape = _ints(entry.size, shown, f"the shape of {name!r}")
        chunks = []
        for c in entry.chunks:
            offsets = _ints(c.offsets, shown, f"a chunk of {name!r}")
            sizes = _ints(c.sizes, shown, f"a chunk of {name!r}")
            if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                    o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)):
                raise _malformed(shown, f"a chunk of {name!r} lies outside its shape {list(shape)}")
            info = where.get((name, offsets))
            if info is None:
                raise _malformed(shown, f"a chunk of {name!r} at {list(offsets)} has no storage record")
            if getattr(info, "transform_descriptors", None):
                raise FormatUnsupported(
                    f"{shown}: tensor {name!r} was saved with DCP's stream transforms "
                    f"{list(info.transform_descriptors)} (compression, quantisation), which layertrack does not read; "
                    "save the checkpoint without them"
                )
            file = str(info.relative_path)
            if Path(file).name != file or file in ("", ".", ".."):
                raise _malformed(shown, f"a chunk of {name!r} points at {file!r}, outside the checkpoint directory")
            chunks.append(Chunk(offsets, sizes, file, int(info.offset), int(info.length)))
        if sum(math.prod(c.sizes) for c in chunks) != math.prod(shape):
            raise _malformed(shown, f"the chunks of {name!r} do not cover its shape {list(shape)} exactly")
        tensors[name] = TensorEntry(name, str(dtype).removeprefix("torch."), shape, tuple(chunks))
    return DcpIndex(tensors, tuple(others))


def read_metadata(directory: Path) -> DcpIndex:
    """The tensor index of the DCP checkpoint in ``directory`` (``.metadata`` read, capped)."""
    from ..checkpoint import read_small_file

    return parse_metadata(read_small_file(directory / METADATA, MAX_METADATA_BYTES), repr(str(directory / METADATA)))


def local_ranges(directory: Path) -> ReadRange:
    """A :data:`ReadRange` over the files of a local checkpoint directory."""
    return lambda file, offset, length: read_range(directory / file, offset, length)


def _decode(raw: bytes, chunk: Chunk, dtype, shown: str):
    import torch

    if raw[:4] == b"PK\x03\x04":  # a torch.save archive of the chunk
        try:
            t = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            raise PickleRefused(f"{shown}: a chunk holds more than plain tensor data ({e}); torch.load with "
                                "weights_only=True refused it, and layertrack loads it no other way") from None
        except Exception as e:  # any other failure of a corrupt archive means the same to the user
            raise _malformed(shown, f"a chunk cannot be loaded: {type(e).__name__}") from None
        if not isinstance(t, torch.Tensor):
            raise _malformed(shown, f"a chunk holds a {type(t).__name__}, not a tensor")
    elif len(raw) == math.prod(chunk.sizes) * dtype.itemsize:  # raw elements
        t = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    else:
        raise _malformed(shown, "a chunk is neither a torch.save archive nor the chunk's raw elements")
    if t.dtype != dtype or t.numel() != math.prod(chunk.sizes):
        raise _malformed(shown, f"a chunk holds {t.dtype} × {t.numel()}, not {dtype} × {math.prod(chunk.sizes)}")
    return t.reshape(chunk.sizes)


def read_tensor(entry: TensorEntry, read_range: ReadRange, shown: str = "the checkpoint"):
    """The whole tensor, assembled from its chunks (each read once, by its byte range)."""
    import torch

    dtype = getattr(torch, entry.dtype)
    where = f"{shown}, tensor {entry.name!r}"
    if len(entry.chunks) == 1 and entry.chunks[0].sizes == entry.shape:
        c = entry.chunks[0]
        return _decode(read_range(c.file, c.offset, c.length), c, dtype, where)
    out = torch.empty(entry.shape, dtype=dtype)
    for c in entry.chunks:
        part = _decode(read_range(c.file, c.offset, c.length), c, dtype, where)
        out[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))] = part
    return out


def read_tensors(entries: Iterable[TensorEntry], read_range: ReadRange, shown: str = "the checkpoint") -> dict:
    """``{name: tensor}`` for ``entries``, chunks read in file and offset order."""
    entries = list(entries)
    order = sorted(entries, key=lambda t: min((c.file, c.offset) for c in t.chunks) if t.chunks else ("", 0))
    return {t.name: read_tensor(t, read_range, shown) for t in order}
