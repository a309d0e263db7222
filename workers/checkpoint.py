"""Resolving a checkpoint URI and loading the model and tokenizer it holds.

A checkpoint is a Hugging Face model directory: ``config.json`` plus safetensors weights,
single-file (``model.safetensors``) or sharded (``model.safetensors.index.json`` + shards).
Pickle weights (``pytorch_model*.bin``) are refused unless explicitly allowed, and then load
with ``weights_only=True``. ``trust_remote_code`` is never set. Scoring loads and runs the
base model (``AutoModel``); only the replaceability analysis loads the model with its LM head
(``AutoModelForCausalLM``), to measure the LM loss.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .errors import (
    CheckpointNotFound,
    CheckpointOutsideRoots,
    InvalidCheckpointURI,
    NoSafetensorsWeights,
    NotACausalLM,
    NotAModelDirectory,
    OutOfMemory,
    TokenizerMissing,
)

DTYPES = ("float32", "bfloat16", "float16")
#: the environment variable that lists the allowed checkpoint roots (os.pathsep-separated)
ROOTS_ENV = "LAYERTRACK_CHECKPOINT_ROOTS"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: dict[str, Any]
    model_type: str
    weights_format: str  # "safetensors" or "pickle"
    weight_files: tuple[str, ...]
    fingerprint: str  # sha256 of config.json and the weight index (names and sizes)


def resolve_checkpoint_path(uri: str, roots: Sequence[str | Path] | None = None) -> Path:
    """Turn a path or ``file://`` URI into a real directory path, inside ``roots`` if given.

    Symlinks are resolved before the root check, so a link that points out of a root is
    refused like a path that does.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidCheckpointURI("the checkpoint URI is empty; give a directory path or file:// URI")
    uri = uri.strip()
    parsed = urlparse(uri)
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
        path = Path(uri).expanduser()
    if "\x00" in str(path):
        raise InvalidCheckpointURI("the checkpoint URI contains a NUL byte")
    real = Path(os.path.realpath(path.absolute()))
    if roots:
        real_roots = [Path(os.path.realpath(Path(r).expanduser().absolute())) for r in roots]
        if not any(real == r or r in real.parents for r in real_roots):
            raise CheckpointOutsideRoots(
                f"checkpoint {uri!r} resolves to {str(real)!r}, which is outside the allowed "
                f"checkpoint roots ({', '.join(map(str, real_roots))}). Move it under a root, or "
                f"allow its directory as a root: add it to the environment variable {ROOTS_ENV} "
                f"(directories separated by {os.pathsep!r}) or start the service with "
                "`layertrack up --roots DIR...`"
            )
    if not real.exists():
        raise CheckpointNotFound(f"checkpoint path {str(path)!r} does not exist")
    if not real.is_dir():
        raise NotAModelDirectory(
            f"checkpoint path {str(path)!r} is a file, not a model directory; give the "
            "directory that holds config.json and model.safetensors"
        )
    return real


def _is_causal_lm(config: dict[str, Any]) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("is_encoder_decoder"):
        return False
    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    archs = config.get("architectures") or []
    return not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def inspect_checkpoint(
    path: Path, *, allow_pickle: bool = False, check_causal_lm: bool = True
) -> CheckpointInfo:
    """Check that ``path`` is a causal-LM checkpoint directory with loadable weights.

    ``check_causal_lm=False`` skips the one check that imports transformers (the API side
    validates and fingerprints a submission without it; the worker checks again).
    """
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise NotAModelDirectory(
            f"{str(path)!r} is not a model directory: it has no config.json. A Hugging Face "
            "checkpoint directory holds config.json and model.safetensors (or shards listed "
            "in model.safetensors.index.json)"
        )
    cfg_bytes = cfg_file.read_bytes()
    try:
        config = json.loads(cfg_bytes)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise NotAModelDirectory(f"{str(cfg_file)!r} is not a valid config ({e})") from None
    model_type = config.get("model_type")
    if not model_type:
        raise NotAModelDirectory(f"{str(cfg_file)!r} has no \"model_type\"; is it a transformers config?")
    if check_causal_lm and not _is_causal_lm(config):
        archs = ", ".join(config.get("architectures") or []) or model_type
        raise NotACausalLM(
            f"checkpoint {str(path)!r} is not a causal language model ({archs}); layertrack "
            "scores decoder-only causal LMs such as Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, OPT"
        )

    safetensors = sorted(p.name for p in path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    pickles = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if safetensors or index.is_file():
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise NotAModelDirectory(f"{str(index)!r} is not a valid shard index ({e})") from None
            missing = [s for s in shards if not (path / s).is_file()]
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
        weights_format, files = "pickle", tuple(pickles)
    else:
        raise NoSafetensorsWeights(
            f"checkpoint {str(path)!r} has config.json but no weights: expected model.safetensors "
            "or model.safetensors.index.json with its shards"
        )
    h = hashlib.sha256(cfg_bytes)
    for name in files:
        h.update(f"\0{name}\0{(path / name).stat().st_size}".encode())
    return CheckpointInfo(
        path=path,
        config=config,
        model_type=model_type,
        weights_format=weights_format,
        weight_files=files,
        fingerprint=h.hexdigest(),
    )


def pick_device(device: str | None = None):
    import torch

    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def load_model(info: CheckpointInfo, *, device=None, dtype=None, with_lm_head: bool = False):
    """Load the base model (``AutoModel``), or with ``with_lm_head`` the causal LM around it
    (``AutoModelForCausalLM``), on ``device`` in ``dtype``, in eval mode."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # Loading the base model, the load report lists the LM head's weights as "unexpected"
    # (left out on purpose) and the progress bar is per tensor: neither helps a user here.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with translate_oom(
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
        )
        model.to(device)
    model.eval()
    return model


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
        return AutoTokenizer.from_pretrained(str(src), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerMissing(f"could not load the tokenizer from {str(src)!r}: {e}") from None
