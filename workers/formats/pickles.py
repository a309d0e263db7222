"""The one way layertrack unpickles a checkpoint's metadata: an unpickler that admits only
the classes named in an allow-list, so a pickle can build those objects and nothing else.

Unpickling runs whatever callables a pickle names (``os.system`` among them), so a checkpoint's
pickled files (DCP's ``.metadata`` and the like) are never given to :func:`pickle.load`. A
format lists the classes its metadata is made of (``ALLOWED``); any other global is refused
with code ``pickle_refused``, whatever the job's ``allow_pickle`` says. Tensor payloads are read
by ``torch.load(weights_only=True)`` (torch's own restricted unpickler), never by this one.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ..errors import MalformedWeights, PickleRefused

#: torch's dtypes by name: a pickled ``torch.float32`` is the global ``torch.float32``
_TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                 "complex64", "complex128", "float8_e4m3fn", "float8_e5m2")


def _lookup(module: str, name: str) -> Any:
    import importlib

    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class _Restricted(pickle.Unpickler):
    def __init__(self, raw: bytes, allowed: Collection[tuple[str, str]], shown: str,
                 substitutes: Mapping[tuple[str, str], Any], persistent: Callable[[Any], Any] | None):
        super().__init__(io.BytesIO(raw))
        self._allowed = allowed
        self._substitutes = substitutes
        self._persistent = persistent
        self._shown = shown

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._substitutes:
            return self._substitutes[(module, name)]
        if (module, name) in self._allowed or (module == "torch" and name in _TORCH_DTYPES):
            return _lookup(module, name)
        raise PickleRefused(
            f"{self._shown} is a pickle that refers to {module}.{name}, which is not one of the classes this "
            "format's metadata is made of; layertrack does not unpickle it, since unpickling can run code. "
            "If the checkpoint was written by the framework itself, report the class name; otherwise do not "
            "trust the file"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is not None:
            return self._persistent(pid)
        raise PickleRefused(f"{self._shown} is a pickle with persistent ids (tensor storage), which metadata never "
                            "holds; layertrack does not unpickle it")


def restricted_loads(raw: bytes, allowed: Collection[tuple[str, str]], shown: str, *,
                     substitutes: Mapping[tuple[str, str], Any] | None = None,
                     persistent: Callable[[Any], Any] | None = None) -> Any:
    """``pickle.loads(raw)`` admitting only the ``(module, name)`` globals in ``allowed`` (and
    torch's dtypes). ``substitutes`` maps globals to what stands for them instead (e.g. a
    tensor-rebuilding function to one that records where the tensor's bytes are);
    ``persistent`` answers persistent ids (refused without it). ``shown``: the file, for
    messages."""
    try:
        return _Restricted(raw, allowed, shown, substitutes or {}, persistent).load()
    except PickleRefused:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            ImportError) as e:
        raise MalformedWeights(f"{shown} cannot be unpickled ({type(e).__name__}: {e}); it is truncated or corrupt: "
                               "copy the checkpoint again, completely") from None
