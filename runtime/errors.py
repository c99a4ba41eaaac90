"""Errors the runtime raises: one readable line that names the problem and the fix.

Every check that can fail runs before ONNX Runtime is asked to do anything, so a bad prompt or a
damaged folder never turns into a crash inside a kernel or into silently wrong numbers. The
classes split by who must act: the folder (re-export / re-download), the caller's input, or the
installation (a missing package or execution provider).
"""
from __future__ import annotations


class TableFreeRuntimeError(Exception):
    """Base of every error this package raises on purpose."""


class RuntimeArtifactError(TableFreeRuntimeError, ValueError):
    """The artifact folder is unusable: missing or truncated files, bad manifest, hash mismatch."""


class ArtifactVersionError(RuntimeArtifactError):
    """The folder was written by a newer format than this runtime reads."""


class InputError(TableFreeRuntimeError, ValueError):
    """The caller's input cannot be run: ids out of range, empty prompt, wrong dtype or shape."""


class ContextLengthError(InputError):
    """Prompt (plus the tokens asked for) does not fit the model's context."""


class ProviderError(TableFreeRuntimeError, RuntimeError):
    """The execution provider asked for is not available or cannot run this graph."""


class MissingDependencyError(TableFreeRuntimeError, ImportError):
    """onnxruntime (or onnxruntime-gpu) is not installed."""


__all__ = [
    "TableFreeRuntimeError",
    "RuntimeArtifactError",
    "ArtifactVersionError",
    "InputError",
    "ContextLengthError",
    "ProviderError",
    "MissingDependencyError",
]
