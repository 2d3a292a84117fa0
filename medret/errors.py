"""Every exception medret raises on purpose.

Each one subclasses a built-in so callers can catch what they already know
(``ValueError``, ``FileNotFoundError``...), and each message names the input and
the problem. Chain the cause with ``raise ... from err``.
"""

from __future__ import annotations


class MedretError(Exception):
    """Base class; never raised directly."""


class ConfigError(MedretError, ValueError):
    """A configuration value is invalid (names the field, the value and what is allowed)."""


class UnknownNameError(MedretError, KeyError):
    """A registry lookup used a name that is not registered (lists the known ones)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class StorageError(MedretError, OSError):
    """Object storage failed after retries (names the URI and the reason)."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The object or file at a URI does not exist."""


class StorageAuthError(StorageError, PermissionError):
    """The storage server rejected our credentials."""


class InvalidURIError(MedretError, ValueError):
    """A URI is malformed or uses an unsupported scheme."""


class S3ServerError(MedretError, RuntimeError):
    """The local SeaweedFS S3 server could not be started or stopped."""


class IndexError_(MedretError, LookupError):
    """Base for code-index problems (named with a trailing underscore: IndexError is a built-in)."""


class TableNotFoundError(IndexError_, FileNotFoundError):
    """No code table of that name exists at the index URI."""


class EncoderMismatchError(IndexError_, ValueError):
    """Codes from one encoder were offered to a table built with another."""


class SchemaError(IndexError_, ValueError):
    """Rows do not fit the code table's schema (wrong code length, missing column...)."""


class DataError(MedretError, ValueError):
    """An input data file is malformed (names the file and what is wrong)."""


class ReadError(DataError):
    """A reader could not decode a file; the message names the file and the reason.

    ``source`` is the file name or URI, ``reason`` the problem in a few words.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class EmptyFileError(ReadError):
    """The file has zero bytes."""


class TruncatedFileError(ReadError):
    """The file ends before the data it declares."""


class CorruptFileError(ReadError):
    """The bytes are not a valid file of the kind they claim to be."""


class UnsupportedFormatError(ReadError):
    """No reader knows this kind of file."""


class NotAnImageError(ReadError):
    """A valid file that holds no image (a DICOM SR or RT plan, for example)."""


class PixelBudgetError(ReadError):
    """The declared image is larger than the configured pixel budget (decompression bomb guard)."""


class MissingSpacingError(ReadError):
    """The physical pixel size (mpp or mm) is missing and the caller gave none."""


class PreprocessError(DataError):
    """A preprocessing step failed on a decoded image (names the step and the input)."""
