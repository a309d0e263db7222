"""Errors raised by the compute side, and every code a worker records for a failed job.

Every error a user can cause has its own class and a stable ``code`` (stored with a
failed job and shown by the API), and a message that says what was wrong and what to do.
The last three are what the job runner (``service/job_runner.py``) records for a failure
that is not one of the others: a job stopped at its time limit, a database or broker that
stayed away through every retry, and a bug. This module imports nothing heavy, so the API
side can use the codes too.

    LayertrackError
    ├── CheckpointError
    │   ├── CheckpointNotFound        code "checkpoint_not_found"
    │   ├── CheckpointOutsideRoots    code "checkpoint_outside_roots"   (the directory, or a file
    │   │                                                                 in it, links out of the roots)
    │   ├── CheckpointUnreadable      code "checkpoint_unreadable"      (permission denied, I/O error)
    │   ├── InvalidCheckpointURI      code "invalid_uri"
    │   │   ├── CheckpointPathTooLong code "path_too_long"
    │   │   └── CredentialsInURI      code "credentials_in_uri"         (user:password@, signed query strings)
    │   ├── HostRefused               code "host_refused"               (an http(s) checkpoint on a private address)
    │   ├── AccessDenied              code "access_denied"              (the store refused the credentials)
    │   ├── StoreUnreachable          code "store_unreachable"          (transient: connection, timeout, 5xx)
    │   ├── CheckpointIncomplete      code "checkpoint_incomplete"      (transient: still being uploaded)
    │   ├── ChecksumMismatch          code "checksum_mismatch"          (a fetched file is not what the store listed)
    │   └── CacheTooSmall             code "cache_too_small"            (the checkpoint exceeds the fetch cache)
    │   ├── NotAModelDirectory        code "not_a_model_directory"
    │   ├── FileTooLarge              code "file_too_large"             (config.json & co. over the cap)
    │   ├── NoSafetensorsWeights      code "no_safetensors_weights"
    │   ├── MalformedWeights          code "malformed_weights"          (truncated or corrupt weights)
    │   ├── PickleRefused             code "pickle_refused"             (objects weights_only refuses, or
    │   │                                                                 a metadata pickle naming a class
    │   │                                                                 its format is not made of)
    │   ├── FormatUnsupported         code "format_unsupported"         (a known layout saved with an
    │   │                                                                 option layertrack does not read)
    │   ├── ArchitectureMissing       code "architecture_missing"       (a framework checkpoint that
    │   │                                                                 carries no architecture)
    │   ├── MappingIncomplete         code "mapping_incomplete"         (its tensors do not fill the
    │   │                                                                 architecture exactly)
    │   ├── CheckpointsDiffer         code "checkpoints_differ"         (two checkpoints compared are
    │   │                                                                 not the same architecture)
    │   ├── NotACausalLM              code "not_a_causal_lm"
    │   └── TokenizerMissing          code "tokenizer_missing"
    ├── ProbeError                    code "invalid_probe"
    ├── TooFewTokens                  code "too_few_tokens"
    ├── DeviceUnavailable             code "device_unavailable"         (a --device this machine does not have)
    ├── OutOfMemory                   code "out_of_memory"
    │   └── PlanDoesNotFit            code "plan_does_not_fit"          (refused before loading: the
    │                                                                     model cannot fit the budget)
    ├── TimeLimitExceeded             code "time_limit"                 (the job ran past the task's
    │                                                                     soft time limit)
    ├── ServiceUnreachable            code "transient_error"            (the database or the broker was
    │                                                                     still away after every retry)
    └── InternalError                 code "internal_error"             (a bug: the worker's log has
                                                                          the traceback)
"""

from __future__ import annotations


class LayertrackError(Exception):
    """Base class: a problem with the user's input or environment, with a clear message."""

    code = "error"
    #: True for errors that may go away by themselves (a store that is down, a checkpoint
    #: still being uploaded): the worker retries them with back-off
    transient = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class CheckpointError(LayertrackError):
    code = "checkpoint_error"


class CheckpointNotFound(CheckpointError):
    code = "checkpoint_not_found"


class CheckpointOutsideRoots(CheckpointError):
    code = "checkpoint_outside_roots"


class CheckpointUnreadable(CheckpointError):
    code = "checkpoint_unreadable"


class InvalidCheckpointURI(CheckpointError):
    code = "invalid_uri"


class CheckpointPathTooLong(InvalidCheckpointURI):
    code = "path_too_long"


class CredentialsInURI(InvalidCheckpointURI):
    code = "credentials_in_uri"


class HostRefused(CheckpointError):
    code = "host_refused"


class AccessDenied(CheckpointError):
    code = "access_denied"


class StoreUnreachable(CheckpointError):
    code = "store_unreachable"
    transient = True


class CheckpointIncomplete(CheckpointError):
    code = "checkpoint_incomplete"
    transient = True


class ChecksumMismatch(CheckpointError):
    code = "checksum_mismatch"
    transient = True


class CacheTooSmall(CheckpointError):
    code = "cache_too_small"


class CheckpointChanged(CheckpointError):
    """The checkpoint's bytes are not those it had when it was submitted (or when scoring
    began): its scores would belong to neither version."""
    code = "checkpoint_changed"


class NotAModelDirectory(CheckpointError):
    code = "not_a_model_directory"


class FileTooLarge(CheckpointError):
    code = "file_too_large"


class NoSafetensorsWeights(CheckpointError):
    code = "no_safetensors_weights"


class MalformedWeights(CheckpointError):
    code = "malformed_weights"


class PickleRefused(CheckpointError):
    code = "pickle_refused"


class FormatUnsupported(CheckpointError):
    code = "format_unsupported"


class ArchitectureMissing(CheckpointError):
    code = "architecture_missing"


class MappingIncomplete(CheckpointError):
    code = "mapping_incomplete"


class CheckpointsDiffer(CheckpointError):
    code = "checkpoints_differ"


class NotACausalLM(CheckpointError):
    code = "not_a_causal_lm"


class TokenizerMissing(CheckpointError):
    code = "tokenizer_missing"


class ProbeError(LayertrackError):
    code = "invalid_probe"


class TooFewTokens(LayertrackError):
    code = "too_few_tokens"


class DeviceUnavailable(LayertrackError):
    """The device asked for is not a device name, or this machine does not have it.
    ``device`` is what was asked for, ``reason`` the message without it."""

    code = "device_unavailable"

    def __init__(self, device: str, reason: str):
        super().__init__(f"device {device!r}: {reason}")
        self.device, self.reason = device, reason


class OutOfMemory(LayertrackError):
    code = "out_of_memory"


class PlanDoesNotFit(OutOfMemory):
    code = "plan_does_not_fit"


class TimeLimitExceeded(LayertrackError):
    code = "time_limit"


class ServiceUnreachable(LayertrackError):
    """Recorded once the retries of a database or broker that was away are spent (the
    retries themselves are of the underlying exceptions)."""

    code = "transient_error"


class InternalError(LayertrackError):
    code = "internal_error"
