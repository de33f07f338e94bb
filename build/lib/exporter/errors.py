"""One error hierarchy for everything a user can cause.

The CLI prints these as a one-line ``error:`` and exits non-zero; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgeshipError(Exception):
    """Base of every error the user can fix."""


class ExportError(EdgeshipError):
    """Something stopped an export."""


class TargetError(ExportError):
    """A target file is missing or invalid."""


class SourceError(ExportError):
    """The model source cannot be read or does not behave as a model."""


class ConversionError(ExportError):
    """A backend could not convert or lower the model for one artifact."""

    def __init__(self, artifact: str, message: str) -> None:
        super().__init__(f"{artifact}: {message}")
        self.artifact = artifact


class ValidationError(ExportError):
    """An artifact did not meet the parity thresholds of its target."""


class OutputError(ExportError):
    """The output folder cannot be written."""


class UnsupportedOnHost(ExportError):
    """The artifact exists but cannot be executed on this machine (Core ML on Linux)."""


class DeviceError(EdgeshipError):
    """Base of the device harness' errors."""
