"""Resolving a checkpoint URI and loading the model and tokenizer it holds.

A checkpoint is a Hugging Face model directory: ``config.json`` plus safetensors weights,
single-file (``model.safetensors``) or sharded (``model.safetensors.index.json`` + shards).
Pickle weights (``pytorch_model*.bin``) are refused unless explicitly allowed, and then load
with ``weights_only=True``; a pickle that this safe loader refuses fails with
``PickleRefused`` (it is never loaded another way). ``trust_remote_code`` is never set.

With checkpoint roots (the service), the directory and every file in it must resolve inside
a root: a symlinked ``model.safetensors`` that points elsewhere is refused like a directory
that does. The small JSON files (config.json, the shard index, tokenizer_config.json, ...)
and safetensors headers are read at most ``MAX_JSON_BYTES`` each, and every safetensors
header is checked (length, JSON, tensor offsets within the file) before anything loads it. Scoring loads and runs the
base model (``AutoModel``); only the replaceability analysis loads the model with its LM head
(``AutoModelForCausalLM``), to measure the LM loss.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .errors import (
    CheckpointError,
    CheckpointNotFound,
    CheckpointOutsideRoots,
    CheckpointPathTooLong,
    CheckpointUnreadable,
    DeviceUnavailable,
    FileTooLarge,
    InvalidCheckpointURI,
    MalformedWeights,
    NoSafetensorsWeights,
    NotACausalLM,
    NotAModelDirectory,
    OutOfMemory,
    PickleRefused,
    TokenizerMissing,
)

DTYPES = ("float32", "bfloat16", "float16")
#: the environment variable that lists the allowed checkpoint roots (os.pathsep-separated)
ROOTS_ENV = "LAYERTRACK_CHECKPOINT_ROOTS"

#: the most bytes read of a checkpoint's small JSON files (``SMALL_FILES``: config.json, the
#: shard index, tokenizer_config.json, ...) and of a safetensors file's JSON header. Real ones
#: are far smaller (a config: a few KiB; the shard index of the largest open models: a few
#: MiB); a larger file is refused (code ``file_too_large``) from its size, before it is read,
#: so that it cannot exhaust the API's or a worker's memory.
MAX_JSON_BYTES = 16 * 2**20
#: the most bytes of each tokenizer vocabulary file (``TOKENIZER_FILES``), larger by nature
#: (tokenizer.json of a 256k-token vocabulary: ~35 MB)
MAX_TOKENIZER_FILE_BYTES = 512 * 2**20
#: files read whole when a model or tokenizer loads: each at most MAX_JSON_BYTES
SMALL_FILES = (
    "config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
    "chat_template.jinja",
)
#: tokenizer vocabularies: each at most MAX_TOKENIZER_FILE_BYTES
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model")
#: bytes per element of the safetensors dtypes (others, such as packed 4-bit types, are left
#: to the safetensors library to check)
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
    "C64": 8,
}


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: dict[str, Any]
    model_type: str
    weights_format: str  # "safetensors" or "pickle"
    weight_files: tuple[str, ...]
    #: the checkpoint's identity (``IDENTITY``): changes whenever its bytes do
    fingerprint: str


def _shown(path: str | Path, limit: int = 120) -> str:
    """A path for a message, quoted, its middle cut when it is very long."""
    text = str(path)
    return repr(text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}")


def _os_error(e: OSError, what: str) -> CheckpointError:
    """The error for a file-system failure while reading ``what`` (a path, a file)."""
    if e.errno == errno.ENAMETOOLONG:
        return CheckpointPathTooLong(
            f"{what}: a name in the path is longer than the file system allows ({os.strerror(e.errno)}; "
            "usually 255 bytes per file or directory name, 4096 per path); give the path of an existing "
            "checkpoint directory"
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return CheckpointUnreadable(
            f"{what}: permission denied; make the checkpoint readable by the user the service and its "
            "workers run as"
        )
    if e.errno == errno.ELOOP:
        return CheckpointUnreadable(f"{what}: too many levels of symbolic links (a symlink loop); fix the links")
    return CheckpointUnreadable(f"{what} cannot be read: {e.strerror or e}")


def _inside(path: Path, real_roots: Sequence[Path]) -> bool:
    return any(path == r or r in path.parents for r in real_roots)


def _roots_advice(real_roots: Sequence[Path]) -> str:
    return f"the allowed checkpoint roots ({', '.join(map(str, real_roots))})"


def _allow_root_advice() -> str:
    return (f"add it to the environment variable {ROOTS_ENV} (directories separated by {os.pathsep!r}) or start "
            "the service with `layertrack up --roots DIR...`")


def _check_links(directory: Path, real_roots: Sequence[Path]) -> None:
    """Refuse a checkpoint directory holding a symlink that resolves outside every root (a
    ``model.safetensors`` linked to a file elsewhere would be read like one inside)."""
    try:
        with os.scandir(directory) as entries:
            links = [(e.name, e.path) for e in entries if e.is_symlink()]
    except OSError as e:
        raise _os_error(e, f"checkpoint directory {_shown(directory)}") from None
    for name, link in sorted(links):
        target = Path(os.path.realpath(link))
        if not _inside(target, real_roots):
            raise CheckpointOutsideRoots(
                f"{name!r} in checkpoint {_shown(directory)} is a symlink to {_shown(target)}, which is outside "
                f"{_roots_advice(real_roots)}: every file a checkpoint is read from must be under a root. Copy "
                f"the file into the checkpoint instead of linking it, or allow its directory as a root: "
                f"{_allow_root_advice()}"
            )


def resolve_checkpoint_path(uri: str, roots: Sequence[str | Path] | None = None) -> Path:
    """Turn a path or ``file://`` URI into a real directory path, inside ``roots`` if given.

    Symlinks are resolved before the root check, so a link that points out of a root is
    refused like a path that does; with ``roots``, so is a directory that holds a symlink (to
    a file or directory) resolving outside every root.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidCheckpointURI("the checkpoint URI is empty; give a directory path or file:// URI")
    uri = uri.strip()
    try:
        parsed = urlparse(uri)
    except ValueError as e:
        raise InvalidCheckpointURI(f"cannot parse checkpoint URI {_shown(uri)} ({e}); give a directory path or "
                                   "file:///absolute/path") from None
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidCheckpointURI(
                f"file URI {uri!r} names host {parsed.netloc!r}; use file:///absolute/path"
            )
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise InvalidCheckpointURI(
            f"unsupported URI scheme {parsed.scheme!r} in {uri!r}: this worker reads local "
            "directories, given as a path or a file:// URI"
        )
    else:
        try:
            path = Path(uri).expanduser()
        except RuntimeError:  # ~name of no known user
            raise InvalidCheckpointURI(f"cannot expand '~' in {_shown(uri)}: no such user's home directory; "
                                       "give an absolute path") from None
    if "\x00" in str(path):
        raise InvalidCheckpointURI("the checkpoint URI contains a NUL byte")
    real = Path(os.path.realpath(path.absolute()))
    real_roots = [Path(os.path.realpath(Path(r).expanduser().absolute())) for r in roots or ()]
    if real_roots and not _inside(real, real_roots):
        raise CheckpointOutsideRoots(
            f"checkpoint {_shown(uri)} resolves to {_shown(real)}, which is outside {_roots_advice(real_roots)}. "
            f"Move it under a root, or allow its directory as a root: {_allow_root_advice()}"
        )
    try:
        mode = os.stat(real).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointNotFound(f"checkpoint path {_shown(path)} does not exist") from None
    except OSError as e:
        raise _os_error(e, f"checkpoint path {_shown(path)}") from None
    if not stat.S_ISDIR(mode):
        raise NotAModelDirectory(
            f"checkpoint path {_shown(path)} is a file, not a model directory; give the "
            "directory that holds config.json and model.safetensors"
        )
    if real_roots:
        _check_links(real, real_roots)
    return real


def _too_large(file: Path, size: int, limit: int) -> FileTooLarge:
    return FileTooLarge(
        f"{_shown(file)} is {size:,} bytes; layertrack reads at most {limit:,} bytes ({limit / 2**20:g} MiB) of "
        f"{file.name}: a real one is far smaller. Is it the right file, complete and uncorrupted?"
    )


def check_file_size(file: Path, limit: int = MAX_JSON_BYTES) -> None:
    """Refuse ``file`` when it is larger than ``limit`` bytes (FileTooLarge)."""
    size = file.stat().st_size
    if size > limit:
        raise _too_large(file, size, limit)


def read_small_file(file: Path, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; a larger one is refused from
    its size before anything is read (FileTooLarge)."""
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO put in the file's place does not block
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise NotAModelDirectory(f"{_shown(file)} is not a regular file")
        if st.st_size > limit:
            raise _too_large(file, st.st_size, limit)
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew after the size was read
        raise _too_large(file, len(data), limit)
    return data


def _plain_file_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name)


def _shard_names(index: Path) -> list[str]:
    """The shard files a weight index names; each must be a file name of the checkpoint's
    directory (not a path that leads out of it)."""
    try:
        shards = sorted(set(json.loads(read_small_file(index))["weight_map"].values()))
    except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as e:
        raise NotAModelDirectory(f"{str(index)!r} is not a valid shard index ({type(e).__name__}: {e})") from None
    odd = [s for s in shards if not _plain_file_name(s)]
    if odd:
        raise NotAModelDirectory(
            f"{str(index)!r} lists shard {odd[0]!r}, which is not a file name: the shards of a "
            "checkpoint are files in its directory (model-00001-of-00002.safetensors, ...)"
        )
    return shards


def check_safetensors(file: Path) -> tuple[dict[str, Any], int]:
    """Check a safetensors file's framing without loading it: the 8-byte header length, the
    JSON header (at most MAX_JSON_BYTES) and every tensor's offsets, which must lie within
    the file and match its dtype and shape; the tensors must reach the end of the file (a
    shorter file was truncated). MalformedWeights otherwise. Returns (header, data start)."""
    return _check_safetensors(file, None)


#: The identity of a local checkpoint (``CheckpointInfo.fingerprint``), what a submission is
#: compared by: sha256 over config.json's bytes and, per weight file, its name, its size, its
#: inode, its modification and status-change times (ns), its safetensors header (the whole
#: JSON: every tensor's name, dtype, shape and offsets) and IDENTITY_SAMPLES ranges of
#: IDENTITY_SAMPLE_BYTES spread evenly over its data; the other files a load reads (SMALL_FILES,
#: TOKENIZER_FILES) by name, size, inode and times. Any write to a file changes its
#: status-change time (which no tool sets back), so rewritten bytes, even of the same shapes,
#: give a new identity; the same directory untouched gives the same one. Cost: the headers
#: and 64 KiB per weight file are read, whatever the checkpoint's size (bench/identity_bench.py).
IDENTITY = "layertrack checkpoint identity v2"
IDENTITY_SAMPLES = 16
IDENTITY_SAMPLE_BYTES = 4096


def _stat_identity(st: os.stat_result) -> bytes:
    return f"{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}".encode()


def _add_samples(identity: Any, fd: int, start: int, end: int) -> None:
    """Hash IDENTITY_SAMPLES ranges spread evenly over bytes [start, end) of an open file."""
    span = end - start
    if span <= IDENTITY_SAMPLES * IDENTITY_SAMPLE_BYTES:
        offsets = range(start, end, IDENTITY_SAMPLE_BYTES)
    else:
        step = (span - IDENTITY_SAMPLE_BYTES) / (IDENTITY_SAMPLES - 1)
        offsets = (start + int(i * step) for i in range(IDENTITY_SAMPLES))
    for offset in offsets:
        identity.update(os.pread(fd, min(IDENTITY_SAMPLE_BYTES, end - offset), offset))


def _check_safetensors(file: Path, identity: Any | None) -> tuple[dict[str, Any], int]:
    """``check_safetensors``; with ``identity`` (a hash), also feed it the file's part of
    the checkpoint's identity (``IDENTITY``)."""
    with os.fdopen(os.open(file, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _malformed(_shown(file), "it is not a regular file")
        size = st.st_size
        head = f.read(8)
        n = header_length(head, size, _shown(file))
        raw = f.read(n)
        header = parse_safetensors_header(raw, size, _shown(file))
        if identity is not None:
            identity.update(_stat_identity(st) + b"\0" + raw)
            _add_samples(identity, f.fileno(), 8 + n, size)
    return header, 8 + n


def _malformed(shown: str, why: str) -> MalformedWeights:
    return MalformedWeights(f"{shown} is not a valid safetensors file: {why}. Write it again "
                            "(save_pretrained) or copy it completely")


def header_length(head: bytes, size: int, shown: str) -> int:
    """The JSON header's length from a safetensors file's first 8 bytes (of a file of ``size``)."""
    if len(head) < 8:
        raise _malformed(shown, f"it is {size} bytes long, shorter than the 8-byte header length (empty or "
                                "truncated)")
    n = int.from_bytes(head, "little")
    if n > MAX_JSON_BYTES:
        raise _malformed(shown, f"it declares a {n:,}-byte header; at most {MAX_JSON_BYTES:,} bytes are read "
                                "(corrupt?)")
    if 8 + n > size:
        raise _malformed(shown, f"it declares a {n:,}-byte header but holds only {size - 8:,} bytes after the "
                                "length (truncated?)")
    return n


def parse_safetensors_header(raw: bytes, size: int, shown: str) -> dict[str, Any]:
    """Check a safetensors JSON header against the size of its file (``check_safetensors``)."""
    def bad(why: str) -> MalformedWeights:
        return _malformed(shown, why)

    n = len(raw)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise bad(f"its header is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_len = size - 8 - n
    last_end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offsets, shape, dtype = (t.get(k) for k in ("data_offsets", "shape", "dtype")) if isinstance(t, dict) else (
            None, None, None)
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(dtype, str)):
            raise bad(f"tensor {name!r} has no valid dtype, shape and data_offsets [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise bad(f"tensor {name!r} has data_offsets {offsets}, which are not increasing")
        if end > data_len:
            raise bad(f"tensor {name!r} ends at byte {end:,} of the data, past the end of the file "
                      f"({data_len:,} bytes of data; truncated?)")
        width = SAFETENSORS_DTYPE_BYTES.get(dtype)
        if width is not None and (end - begin) != math.prod(shape) * width:
            raise bad(f"tensor {name!r} ({dtype}, shape {shape}) needs "
                      f"{math.prod(shape) * width:,} bytes but its data_offsets span {end - begin:,}")
        last_end = max(last_end, end)
    if last_end < data_len:
        raise bad(f"its tensors end at byte {last_end:,} of the data but the file holds {data_len:,}")
    return header


def _is_causal_lm(config: dict[str, Any]) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("is_encoder_decoder"):
        return False
    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    archs = config.get("architectures") or []
    return not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def inspect_checkpoint(
    path: Path, *, allow_pickle: bool = False, check_causal_lm: bool = True, pending: dict[str, int] | None = None
) -> CheckpointInfo:
    """Check that ``path`` is a causal-LM checkpoint directory with loadable weights: its
    config, its weight files (every safetensors header) and the size of the small files a
    load reads.

    ``check_causal_lm=False`` skips the one check that imports transformers (the API side
    validates and fingerprints a submission without it; the worker checks again).
    ``pending``: weight files still being fetched, name → size (their headers were checked
    at the store); they need not be present yet.
    """
    try:
        return _inspect(path, allow_pickle=allow_pickle, check_causal_lm=check_causal_lm, pending=pending or {})
    except OSError as e:
        where = f"checkpoint {_shown(path)}" if e.filename is None else _shown(e.filename)
        raise _os_error(e, where) from None


def _inspect(path: Path, *, allow_pickle: bool, check_causal_lm: bool, pending: dict[str, int]) -> CheckpointInfo:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise NotAModelDirectory(
            f"{str(path)!r} is not a model directory: it has no config.json. A Hugging Face "
            "checkpoint directory holds config.json and model.safetensors (or shards listed "
            "in model.safetensors.index.json)"
        )
    cfg_bytes = read_small_file(cfg_file)
    try:
        config = json.loads(cfg_bytes)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        archs = config.get("architectures")
        if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
            raise ValueError('"architectures" is not a list of class names')
    except (ValueError, RecursionError) as e:
        raise NotAModelDirectory(f"{str(cfg_file)!r} is not a valid config ({e})") from None
    model_type = config.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise NotAModelDirectory(f"{str(cfg_file)!r} has no \"model_type\"; is it a transformers config?")
    if check_causal_lm and not _is_causal_lm(config):
        archs = ", ".join(config.get("architectures") or []) or model_type
        raise NotACausalLM(
            f"checkpoint {str(path)!r} is not a causal language model ({archs}); layertrack "
            "scores decoder-only causal LMs such as Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, OPT"
        )

    safetensors = sorted({p.name for p in path.glob("*.safetensors")} | set(pending))
    index = path / "model.safetensors.index.json"
    pickles = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if safetensors or index.is_file():
        if index.is_file():
            shards = _shard_names(index)
            missing = [s for s in shards if not (path / s).is_file() and s not in pending]
            if missing:
                raise NoSafetensorsWeights(
                    f"checkpoint {str(path)!r} is incomplete: shard(s) {', '.join(missing)} listed "
                    "in model.safetensors.index.json are missing (still being written?)"
                )
            safetensors = shards
        weights_format, files = "safetensors", tuple(safetensors)
    elif pickles:
        if not allow_pickle:
            raise NoSafetensorsWeights(
                f"checkpoint {str(path)!r} has only pickle weights ({', '.join(pickles)}) and no "
                "safetensors. Pickle files can run code when loaded, so they are refused by "
                "default: save the model with save_pretrained(safe_serialization=True), or allow "
                "pickle explicitly (--allow-pickle); it then loads with weights_only=True"
            )
        if (path / "pytorch_model.bin.index.json").is_file():  # transformers reads the shards it names
            _shard_names(path / "pytorch_model.bin.index.json")
        weights_format, files = "pickle", tuple(pickles)
    else:
        raise NoSafetensorsWeights(
            f"checkpoint {str(path)!r} has config.json but no weights: expected model.safetensors "
            "or model.safetensors.index.json with its shards"
        )
    h = hashlib.sha256(f"{IDENTITY}\0".encode() + cfg_bytes)
    for name in files:
        h.update(f"\0{name}\0".encode())
        if name in pending:  # being fetched: its header was checked at the store
            h.update(f"pending {pending[name]}".encode())
        elif weights_format == "safetensors":
            _check_safetensors(path / name, h)
        else:
            with os.fdopen(os.open(path / name, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                st = os.fstat(f.fileno())
                h.update(_stat_identity(st))
                _add_samples(h, f.fileno(), 0, st.st_size)
    for name in SMALL_FILES:  # read whole by transformers when it loads the model or tokenizer
        if (path / name).is_file():
            check_file_size(path / name)
    for name in (*SMALL_FILES, *TOKENIZER_FILES):
        with contextlib.suppress(FileNotFoundError):
            h.update(f"\0{name}\0".encode() + _stat_identity((path / name).stat()))
    return CheckpointInfo(
        path=path,
        config=config,
        model_type=model_type,
        weights_format=weights_format,
        weight_files=files,
        fingerprint=h.hexdigest(),
    )


def available_devices() -> list[str]:
    """The devices torch can use on this machine: cpu, then cuda:0 ... and mps when present."""
    import torch

    here = ["cpu"]
    if torch.cuda.is_available():
        here += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        here.append("mps")
    return here


def pick_device(device: str | None = None):
    """The torch device of a job: ``device`` (cpu, cuda, cuda:N, mps) when this machine has it,
    else ``DeviceUnavailable`` naming the devices there are; None: cuda when present, else cpu."""
    import torch

    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = ", ".join(available_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceUnavailable(device, f"not a device name (cpu, cuda, cuda:N, mps); devices here: {here}"
                                       ) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            reason = "this machine has no CUDA device (torch.cuda.is_available() is false)"
            if torch.version.cuda is None:
                reason += "; this torch is a CPU build (the README says how to install the CUDA one)"
            raise DeviceUnavailable(device, f"{reason}; devices here: {here}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                device, f"this machine has {torch.cuda.device_count()} CUDA device(s); devices here: {here}")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceUnavailable(device, f"this machine has no MPS device; devices here: {here}")
        return dev
    try:  # another backend (xpu, ...): usable only if a tensor can be made there
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, AttributeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DeviceUnavailable(device, f"this machine cannot use it ({first}); devices here: {here}"
                                       ) from None
    return dev


def pick_dtype(dtype: str | None, device) -> Any:
    """The job's dtype, or the default for the device: float32 on CPU, bf16 (else fp16) on CUDA."""
    import torch

    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    text = str(exc).lower()
    return any(
        s in text
        for s in ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
    )


@contextlib.contextmanager
def translate_oom(what: str, advice: str) -> Iterator[None]:
    """Turn the allocator's out-of-memory errors into a clear OutOfMemory."""
    try:
        yield
    except Exception as e:
        if is_out_of_memory(e):
            raise OutOfMemory(f"out of memory while {what}: {str(e).splitlines()[0][:200]}. {advice}") from None
        raise


def load_model(info: CheckpointInfo, *, device=None, dtype=None, with_lm_head: bool = False,
               placement: tuple[str, dict[int, int]] | None = None):
    """Load the base model (``AutoModel``), or with ``with_lm_head`` the causal LM around it
    (``AutoModelForCausalLM``), on ``device`` in ``dtype``, in eval mode. ``placement``
    (a device map such as "auto", and bytes per CUDA index) spreads it over several GPUs."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # Loading the base model, the load report lists the LM head's weights as "unexpected"
    # (left out on purpose) and the progress bar is per tensor: neither helps a user here.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with _weights_errors(info), translate_oom(
        f"loading {str(info.path)!r}",
        "Use a smaller --dtype (bfloat16), a machine with more memory, or free memory first.",
    ):
        model = (AutoModelForCausalLM if with_lm_head else AutoModel).from_pretrained(
            str(info.path),
            dtype=dtype,
            use_safetensors=info.weights_format == "safetensors",
            weights_only=True,
            trust_remote_code=False,
            local_files_only=True,
            **({"device_map": placement[0], "max_memory": placement[1]} if placement else {}),
        )
        if not placement:
            model.to(device)
    model.eval()
    return model


#: what torch's safe unpickler names when it refuses a pickle
_REFUSED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]{1,200})", re.IGNORECASE)
_REFUSED_OPCODE = re.compile(r"Unsupported operand (\d{1,5})")


@contextlib.contextmanager
def _weights_errors(info: CheckpointInfo) -> Iterator[None]:
    """Turn the loaders' errors about the weight files into MalformedWeights or PickleRefused.
    Their own messages are not passed on: torch's advice for a refused pickle is to load it
    unsafely, which layertrack never does."""
    from safetensors import SafetensorError

    files = ", ".join(info.weight_files)
    try:
        yield
    except SafetensorError as e:
        raise MalformedWeights(
            f"the safetensors weights of {_shown(info.path)} ({files}) cannot be read ({e}); they are truncated "
            "or corrupt: write them again (save_pretrained) or copy them completely"
        ) from None
    except pickle.UnpicklingError as e:
        text = str(e)
        found = _REFUSED_GLOBAL.search(text)
        opcode = _REFUSED_OPCODE.search(text)
        what = (f"it refers to {found[1]!r}, which is not plain tensor data" if found
                else f"it uses pickle opcode {opcode[1]}, which safe loading does not allow (or it is corrupt)"
                if opcode else "it holds more than plain tensor data (or it is corrupt)")
        raise PickleRefused(
            f"the pickle weights of {_shown(info.path)} ({files}) were refused by safe loading "
            f"(torch.load with weights_only=True): {what}. layertrack loads pickles no other way, since "
            "unpickling can run code. Convert the checkpoint to safetensors where you trust it "
            "(model.save_pretrained(dir, safe_serialization=True)) and submit that"
        ) from None
    except RuntimeError as e:
        if info.weights_format == "pickle" and "PytorchStreamReader" in str(e):
            raise MalformedWeights(
                f"the pickle weights of {_shown(info.path)} ({files}) are not a readable PyTorch file: truncated "
                "or corrupt. Save them again, preferably as safetensors (save_pretrained)"
            ) from None
        raise


def load_tokenizer(path: Path, tokenizer_path: str | Path | None = None):
    """The checkpoint's own tokenizer, or the one in ``tokenizer_path`` when given."""
    from transformers import AutoTokenizer

    src = Path(tokenizer_path).expanduser() if tokenizer_path else path
    if not src.is_dir():
        raise TokenizerMissing(f"tokenizer directory {str(src)!r} does not exist")
    files = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"}
    if not any((src / f).is_file() for f in files):
        raise TokenizerMissing(
            f"no tokenizer files in {str(src)!r} (tokenizer.json, tokenizer_config.json, ...). "
            "Training checkpoints often omit the tokenizer: pass --tokenizer with a directory "
            "that holds it, or save it with the checkpoint (tokenizer.save_pretrained)"
        )
    try:
        for name, limit in [(n, MAX_JSON_BYTES) for n in SMALL_FILES] + [
                (n, MAX_TOKENIZER_FILE_BYTES) for n in TOKENIZER_FILES]:
            if (src / name).is_file():
                check_file_size(src / name, limit)
    except OSError as e:
        raise _os_error(e, _shown(e.filename or src)) from None
    try:
        return AutoTokenizer.from_pretrained(str(src), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerMissing(f"could not load the tokenizer from {str(src)!r}: {e}") from None
