"""Checkpoints as training frameworks write them, opened as one thing: a :class:`Native`
checkpoint knows its format, the files that make it, its identity, its architecture (a
transformers config), the mapping of its tensors onto that architecture's parameters, and
reads the model's tensors alone (never the optimizer's, the scheduler's or the data
loader's).

A directory with ``config.json`` is a Hugging Face checkpoint and does not come here
(``workers/checkpoint.py`` reads it). Any other directory is recognised by its layout
(:data:`FORMATS`), or named with ``--format``:

    nanogpt  ``ckpt.pt`` holding ``model`` and ``model_args`` (nanoGPT's train.py)
    dcp      ``.metadata`` + ``__R_I.distcp`` (torch.distributed.checkpoint) with the model's
             tensors under ``model.`` named as the transformers model names its parameters
             (accelerate's FSDP SHARDED_STATE_DICT, FSDP2's ``get_model_state_dict``); the
             architecture is given with ``--model-config``
    litgpt   ``lit_model.pth`` beside ``model_config.yaml`` (``litgpt pretrain``/``finetune``'s
             ``step-N/``, also when a copied ``config.json`` sits beside them)

Scoring reads them resident (the whole model in memory); a checkpoint whose model does not
fit the memory budget is refused until streamed execution reads these formats.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArchitectureMissing, FormatUnsupported, NotAModelDirectory
from . import dcp, litgpt, mapping, nanogpt, torchsave, torchtitan

#: format name -> what its directory looks like (for the error that lists them)
FORMATS = {
    "hf": "config.json beside model.safetensors (or shards and their index): a transformers save_pretrained",
    "nanogpt": "ckpt.pt holding 'model' and 'model_args', as nanoGPT's train.py saves it",
    "dcp": ".metadata beside __0_0.distcp, ... (torch.distributed.checkpoint): the model under 'model.' in "
           "transformers names (accelerate FSDP, FSDP2) or torchtitan's step-N/ (found by its names); needs "
           "--model-config",
    "torchtitan": "a DCP directory (step-N/) as torchtitan's CheckpointManager writes it: tok_embeddings, "
                  "layers.N.attention..., beside optimizer and train_state; needs --model-config (llama, qwen3)",
    "litgpt": "lit_model.pth beside model_config.yaml, as litgpt's pretrain and finetune save a step (Llama and "
              "GPT-NeoX configs)",
}
#: formats laid out as DCP directories (the same files, identity and commit marker)
DCP_FORMATS = ("dcp", "torchtitan")
NANOGPT_FILE = "ckpt.pt"
#: a transformers checkpoint's weights (a litgpt directory holds config.json copied beside lit_model.pth, not these)
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
IDENTITY = "layertrack native checkpoint identity v1"
IDENTITY_SAMPLES = 16
IDENTITY_SAMPLE_BYTES = 4096


def known_formats() -> str:
    return "; ".join(f"{name}: {looks}" for name, looks in FORMATS.items())


def detect(path: Path) -> str | None:
    """The format of the directory ``path`` from its layout, or None."""
    if (path / litgpt.LIT_MODEL).is_file() and not any((path / f).is_file() for f in HF_WEIGHTS):
        return "litgpt"
    if (path / "config.json").is_file():
        return "hf"
    if (path / dcp.METADATA).is_file():
        return "dcp"
    if (path / NANOGPT_FILE).is_file():
        return "nanogpt"
    return None


@dataclass
class Native:
    """One framework checkpoint, indexed from its metadata (no weight read yet)."""

    format: str
    path: Path
    #: the files that make the checkpoint, relative to ``path`` (the model's and the others')
    files: tuple[str, ...]
    #: the transformers config, as config.json would hold it
    architecture: dict[str, Any]
    targets: list[mapping.Target]
    #: checkpoint tensors the mapping leaves out on purpose (buffers, a tied head's second name)
    ignored: list[str]
    #: the model's tensors by the mapping's source names: name -> bytes to read
    tensor_bytes: dict[str, int]
    _read: Callable[[str], Any] = field(repr=False)
    #: the model's elements (a storage two names share counted once)
    n_elements: int = 0
    #: the file that holds the metadata (its bytes are part of the identity)
    metadata_file: str = ""
    #: the --model-config file the architecture came from, if any
    model_config: Path | None = None

    @property
    def model_type(self) -> str:
        return self.architecture["model_type"]

    @property
    def model_bytes(self) -> int:
        return sum(self.tensor_bytes.values())

    def read(self, name: str):
        return self._read(name)

    def fingerprint(self) -> str:
        return identity(self.path, self.format, self.model_config)

    def check(self, parameters) -> None:
        mapping.check(self.targets, parameters, self.tensor_bytes, ignored=self.ignored,
                      what=f"the {self.format} checkpoint {str(self.path)!r}")

    def state_dict(self) -> dict[str, Any]:
        """``{parameter: tensor}`` of the transformers model (each source read once)."""
        return mapping.materialize(self.targets, self.read)


def checkpoint_files(path: Path, fmt: str) -> tuple[str, ...]:
    """The files that make the ``fmt`` checkpoint in ``path``, from the listing alone."""
    if fmt == "nanogpt":
        return (NANOGPT_FILE,)
    if fmt == "litgpt":
        return (litgpt.LIT_MODEL, *((litgpt.MODEL_CONFIG,) if (path / litgpt.MODEL_CONFIG).is_file() else ()))
    if fmt in DCP_FORMATS:
        return (dcp.METADATA, *sorted(p.name for p in path.iterdir() if p.name.endswith(".distcp")))
    raise FormatUnsupported(f"unknown format {fmt!r}; the formats known: {', '.join(FORMATS)}")


def complete_files(path: Path, fmt: str) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of each file of the ``fmt`` checkpoint in ``path`` when it is
    completely written; CheckpointIncomplete saying what is missing when not (yet). What marks
    it complete is the framework's own commit: DCP writes ``.metadata`` after every rank's data
    files; ``torch.save`` writes a zip archive whose central directory comes last; litgpt
    writes ``model_config.yaml`` after ``lit_model.pth``."""
    import zipfile

    from ..errors import CheckpointIncomplete

    if fmt in DCP_FORMATS and not (path / dcp.METADATA).is_file():
        raise CheckpointIncomplete(f"{str(path)!r} has no {dcp.METADATA} yet (DCP writes it last)")
    if fmt == "nanogpt":
        f = path / NANOGPT_FILE
        if not f.is_file():
            raise CheckpointIncomplete(f"{str(path)!r} has no {NANOGPT_FILE} yet")
        if not zipfile.is_zipfile(f):
            raise CheckpointIncomplete(f"{str(f)!r} is not a whole torch.save archive yet (still being written?)")
    if fmt == "litgpt":
        f = path / litgpt.LIT_MODEL
        if not f.is_file():
            raise CheckpointIncomplete(f"{str(path)!r} has no {litgpt.LIT_MODEL} yet")
        if not zipfile.is_zipfile(f):
            raise CheckpointIncomplete(f"{str(f)!r} is not a whole torch.save archive yet (still being written?)")
        if not (path / litgpt.MODEL_CONFIG).is_file():
            raise CheckpointIncomplete(f"{str(path)!r} has no {litgpt.MODEL_CONFIG} yet (litgpt writes it after "
                                       f"{litgpt.LIT_MODEL})")
    out = []
    for name in checkpoint_files(path, fmt):
        st = (path / name).stat()
        out.append((name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def config_file(source: str | Path) -> Path:
    """The config.json a ``--model-config`` value names (the file, or the one in a directory)."""
    p = Path(source).expanduser()
    return p / "config.json" if p.is_dir() else p


def identity(path: Path, fmt: str, model_config: str | Path | None = None) -> str:
    """The identity of a framework checkpoint (``CheckpointInfo.fingerprint``), from its files
    alone (no pickle is read, no torch imported: the API computes it too): sha256 over the
    layout (dcp for every DCP-based format), the --model-config file's bytes, the metadata
    file's bytes (``.metadata``), and for every file of the checkpoint its name, size, inode,
    modification and status-change times and 16 ranges of 4 KiB spread over it. Rewritten
    bytes give a new identity (a write changes the status-change time, which no tool sets
    back), the same files untouched the same one; so does another architecture for the same
    tensors."""
    from ..checkpoint import read_small_file

    h = hashlib.sha256(IDENTITY.encode())
    # the layout, not the naming found in it: the API says "dcp" of a torchtitan directory
    h.update(f"\0{'dcp' if fmt in DCP_FORMATS else fmt}\0".encode())
    if model_config is not None:
        h.update(read_small_file(config_file(model_config)))
    for name in checkpoint_files(path, fmt):
        file = path / name
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            h.update(f"\0{name}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0".encode())
            if name in (dcp.METADATA, litgpt.MODEL_CONFIG):  # metadata: every byte
                h.update(os.pread(fd, min(st.st_size, dcp.MAX_METADATA_BYTES), 0))
            else:
                _add_samples(h, fd, st.st_size)
        finally:
            os.close(fd)
    return h.hexdigest()


def _add_samples(h: Any, fd: int, size: int) -> None:
    if size <= IDENTITY_SAMPLES * IDENTITY_SAMPLE_BYTES:
        offsets = range(0, size, IDENTITY_SAMPLE_BYTES)
    else:
        step = (size - IDENTITY_SAMPLE_BYTES) / (IDENTITY_SAMPLES - 1)
        offsets = (int(i * step) for i in range(IDENTITY_SAMPLES))
    for offset in offsets:
        h.update(os.pread(fd, min(IDENTITY_SAMPLE_BYTES, size - offset), offset))


def model_config_dict(source: str | Path) -> dict[str, Any]:
    """A transformers config from ``--model-config``: a config.json file or a directory with one."""
    from ..checkpoint import read_small_file

    file = config_file(source)
    if not file.is_file():
        raise ArchitectureMissing(f"--model-config {str(source)!r}: no such file (give a transformers config.json, "
                                  "or the directory that holds one)")
    try:
        config = json.loads(read_small_file(file))
    except ValueError as e:
        raise ArchitectureMissing(f"--model-config {str(file)!r} is not JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ArchitectureMissing(f"--model-config {str(file)!r} is not a transformers config (it has no "
                                  "\"model_type\")")
    return config


def open_native(path: Path, *, format: str | None = None, model_config: str | Path | None = None) -> Native:
    """The framework checkpoint in the directory ``path`` (``format`` names it; else it is
    detected). ``model_config``: the architecture for a format that carries none (or to use
    instead of the one it carries)."""
    fmt = format or detect(path)
    if fmt is None:
        raise NotAModelDirectory(
            f"{str(path)!r} is not a model directory: it has no config.json and no layout layertrack reads. "
            f"The formats known: {known_formats()}. Name one with --format when it is there but not found"
        )
    if fmt not in FORMATS:
        raise FormatUnsupported(f"unknown format {fmt!r}; the formats known: {', '.join(FORMATS)}")
    given = model_config_dict(model_config) if model_config is not None else None
    if fmt == "nanogpt":
        out = _open_nanogpt(path, given)
    elif fmt == "litgpt":
        out = _open_litgpt(path, given)
    elif fmt in DCP_FORMATS:
        out = _open_dcp(path, given, fmt)
    else:
        raise FormatUnsupported(f"format {fmt!r} is read by the Hugging Face loader, not here")  # "hf"
    out.model_config = config_file(model_config) if model_config is not None else None
    return out


def _open_nanogpt(path: Path, given: dict[str, Any] | None) -> Native:
    file = path / NANOGPT_FILE
    shown = repr(str(file))
    if not file.is_file():
        raise FormatUnsupported(f"{str(path)!r} holds no {NANOGPT_FILE}, the file nanoGPT's train.py writes")
    read_at, size = torchsave.local_reader(file)
    index = torchsave.read_index(read_at, size, shown)
    if not nanogpt.is_nanogpt(index):
        raise FormatUnsupported(f"{shown} is not a nanoGPT checkpoint: it has no 'model' state dict beside "
                                "'model_args'")
    arch = given or nanogpt.architecture(index, shown)
    tensors = nanogpt.model_tensors(index)
    targets = nanogpt.targets(index, arch)

    def read(name: str):
        return torchsave.read_tensor(index.tensors[nanogpt.source_name(name, index)], read_at)

    # a storage shared by two names (a tied head) is read once
    by_storage = {t.storage: t for t in tensors.values()}
    tensor_bytes = {n: by_storage.pop(t.storage).nbytes if t.storage in by_storage else 0 for n, t in tensors.items()}
    n_elements = sum(math.prod(t.shape) for t in {t.storage: t for t in tensors.values()}.values())
    return Native("nanogpt", path, (NANOGPT_FILE,), arch, targets, nanogpt.ignored(index), tensor_bytes, read,
                  n_elements=n_elements)


def _open_litgpt(path: Path, given: dict[str, Any] | None) -> Native:
    file = path / litgpt.LIT_MODEL
    shown = repr(str(file))
    if not file.is_file():
        raise FormatUnsupported(f"{str(path)!r} holds no {litgpt.LIT_MODEL}, the file litgpt's pretrain and finetune "
                                "write")
    read_at, size = torchsave.local_reader(file)
    index = torchsave.read_index(read_at, size, shown)
    tensors = litgpt.model_tensors(index)
    if "transformer.wte.weight" not in tensors:
        held = ", ".join(sorted({n.split(".")[0] for n in index.tensors})[:8]) or "no tensors"
        raise FormatUnsupported(f"{shown} is not a litgpt checkpoint: it has no transformer.wte.weight under 'model' "
                                f"or at the top level (it holds {held})")
    config_file = path / litgpt.MODEL_CONFIG
    arch = given or litgpt.architecture(litgpt.read_config(config_file), tensors, repr(str(config_file)))
    targets, ignored = litgpt.targets(tensors, arch)

    def read(name: str):
        return torchsave.read_tensor(index.tensors[litgpt.source_name(name, index)], read_at)

    # a storage shared by two names (a tied head) is read once, by the name not ignored
    tensor_bytes: dict[str, int] = {}
    storages: set[str] = set()
    for name in sorted(tensors, key=lambda name: name in ignored):
        t = tensors[name]
        tensor_bytes[name] = 0 if t.storage in storages else t.nbytes
        storages.add(t.storage)
    n_elements = sum(math.prod(t.shape) for t in {t.storage: t for t in tensors.values()}.values())
    files = checkpoint_files(path, "litgpt")
    return Native("litgpt", path, files, arch, targets, ignored, tensor_bytes, read, n_elements=n_elements,
                  metadata_file=litgpt.MODEL_CONFIG if litgpt.MODEL_CONFIG in files else "")


def _open_dcp(path: Path, given: dict[str, Any] | None, fmt: str) -> Native:
    """A DCP directory: the model under ``model.`` in transformers names (accelerate, FSDP2),
    or torchtitan's top-level names (``fmt`` "torchtitan", or found by its names)."""
    if not (path / dcp.METADATA).is_file():
        from ..errors import CheckpointIncomplete

        raise CheckpointIncomplete(f"{str(path)!r} has no {dcp.METADATA}: DCP writes it after every rank's files, so "
                                   "the save has not finished (or this is not a DCP directory)")
    index = dcp.read_metadata(path)
    titan = fmt == "torchtitan" or (not index.under("model.") and torchtitan.looks_like(index.tensors))
    model = ({n: index.tensors[n] for n in torchtitan.model_tensors(index.tensors)} if titan
             else index.under("model."))
    if not model:
        held = ", ".join(sorted({n.split(".")[0] for n in index.tensors})[:8]) or "no tensors"
        raise FormatUnsupported(
            f"the DCP checkpoint {str(path)!r} has no model tensors layertrack knows (it holds {held}); it reads "
            "DCP checkpoints whose model state dict is saved under the key 'model' in transformers names, and "
            f"torchtitan's (top-level {', '.join(torchtitan.MODEL_ROOTS)}). The formats known: {known_formats()}")
    what = "torchtitan" if titan else "DCP"
    if given is None:
        raise ArchitectureMissing(
            f"the {what} checkpoint {str(path)!r} carries no architecture: give the transformers config of the model "
            "it was trained as with --model-config FILE|DIR (a config.json)")
    if titan:
        targets, ignored = torchtitan.targets(model, given)
    else:
        targets, ignored = mapping.renamed({n: n for n in model}), []
    read_range = dcp.local_ranges(path)
    shown = repr(str(path))

    def read(name: str):
        return dcp.read_tensor(model[name], read_range, shown)

    files = (dcp.METADATA, *index.files)
    counted = {n: t for n, t in model.items() if n not in ignored}
    return Native("torchtitan" if titan else "dcp", path, files, given, targets, ignored,
                  {n: t.stored_bytes for n, t in counted.items()}, read,
                  n_elements=sum(math.prod(t.shape) for t in counted.values()), metadata_file=dcp.METADATA)


def build_model(native: Native, *, device=None, dtype=None, with_lm_head: bool = False):
    """The transformers model of ``native``'s architecture with its mapped weights, in eval
    mode: built without initialising weights (parameters on the meta device, buffers real),
    checked against the mapping (``mapping_incomplete`` before anything is read), then given
    the checkpoint's tensors. The base model unless ``with_lm_head``."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    arch = dict(native.architecture)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    native.check(model.state_dict())
    state = native.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.to(device=device, dtype=dtype)
    model.eval()
    return model if with_lm_head else model.base_model
