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


class InfrastructureError(MedretError):
    """Marker: the infrastructure failed (a store down, throttling, expired credentials), not an input.

    An indexing job never quarantines an object for an infrastructure fault: it retries, and
    if the fault persists it stops with nothing lost (:class:`JobStoppedError`).
    """


class StorageError(MedretError, OSError):
    """Object storage failed after retries (names the URI and the reason)."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The object or file at a URI does not exist."""


class StorageUnavailableError(StorageError, InfrastructureError):
    """The store could not be reached or did not answer: connection refused or reset, DNS, timeouts,
    5xx and throttling after the client's own retries."""


class StorageAuthError(StorageError, PermissionError, InfrastructureError):
    """The storage server rejected our credentials (wrong, missing or expired)."""


class IndexStoreError(InfrastructureError, OSError):
    """The storage under a code table (a folder or ``s3://``) could not be read or written."""


class SearchUnavailableError(InfrastructureError, RuntimeError):
    """A sharded code table could not answer in full: a shard died, is restarting, could not be reached
    or did not answer in time (HTTP 503). No partial answer is ever given; retry later.

    ``table`` is the table's name, ``shards`` the numbers of the shards that failed.
    """

    def __init__(self, message: str, *, table: str = "", shards: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.table = table
        self.shards = shards


class JobStoppedError(MedretError, RuntimeError):
    """An indexing job stopped before the end, losing nothing: the same command resumes it.

    ``summary`` is the job's summary up to the stop, when there is one.
    """

    #: exit status of the command line (EX_TEMPFAIL: try again later)
    exit_code = 75

    def __init__(self, message: str, summary: object = None) -> None:
        super().__init__(message)
        self.summary = summary


class StoreUnreachableError(JobStoppedError):
    """The source or the index storage stayed unreachable for longer than ``storage_retry_s``."""


class QuarantineStormError(JobStoppedError):
    """Too large a share of a run's objects failed to read: a systematic fault, not bad files."""


def fault_of(err: BaseException) -> str:
    """Whose fault ``err`` is: ``"infra"`` (retry, never quarantine), ``"auth"`` (credentials refused:
    stop, never quarantine), ``"gone"`` (the object vanished
    after it was listed: the next run sees it deleted) or ``"object"`` (quarantine with the reason).

    >>> fault_of(StorageUnavailableError("s3://b/k: connection refused")), fault_of(ValueError("bad"))
    ('infra', 'object')
    """
    if isinstance(err, StorageAuthError):
        return "auth"
    if isinstance(err, InfrastructureError) or any(_failing_mount(e) for e in _chain(err)):
        return "infra"
    if isinstance(err, ObjectNotFoundError):
        return "gone"
    return "object"


#: errnos of a failing disk or network mount: EIO ENOTCONN ETIMEDOUT EHOSTDOWN EHOSTUNREACH ESTALE EREMOTEIO
UNAVAILABLE_ERRNO = frozenset({5, 107, 110, 112, 113, 116, 121})


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and every exception it was raised from or while handling, each once."""
    seen: list[BaseException] = []
    at: BaseException | None = err
    while at is not None and not any(at is s for s in seen) and len(seen) < 32:
        seen.append(at)
        at = at.__cause__ or at.__context__
    return seen


def _failing_mount(err: BaseException | None) -> bool:
    """A library that opens a local file itself (a slide reader) meets a failing mount as a bare OSError."""
    return isinstance(err, OSError) and err.errno in UNAVAILABLE_ERRNO


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


class NotFound(MedretError, LookupError):
    """A table or item the request names does not exist (HTTP 404)."""


class Forbidden(MedretError, PermissionError):
    """The request would read outside the configured roots (HTTP 403)."""


class UploadTooLarge(DataError):
    """An upload is over the configured size limit (HTTP 413)."""


class Busy(MedretError, RuntimeError):
    """The service is at its limit for this kind of request; retry later (HTTP 503 with Retry-After)."""


class PreprocessError(DataError):
    """A preprocessing step failed on a decoded image (names the step and the input)."""
