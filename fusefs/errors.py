"""One exception family for fusefs, and the one place that maps failures to errno."""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


class FusefsError(Exception):
    """Base of every error fusefs raises on purpose; carries the errno it maps to."""

    errno: int = errno.EIO

    def __init__(self, message: str = "", *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        if cause is not None:
            self.__cause__ = cause


class NotFound(FusefsError):
    """The object, prefix or bucket does not exist."""

    errno = errno.ENOENT


class AccessDenied(FusefsError):
    """The store refused the credentials or the operation."""

    errno = errno.EACCES


class ReadOnly(FusefsError):
    """A write was attempted on a read-only mount."""

    errno = errno.EROFS


class NotADirectory(FusefsError):
    errno = errno.ENOTDIR


class IsADirectory(FusefsError):
    errno = errno.EISDIR


class InvalidArgument(FusefsError):
    errno = errno.EINVAL


class StaleVersion(FusefsError):
    """The object changed on the store since it was opened (ETag/generation mismatch)."""

    errno = errno.ESTALE


class Conflict(FusefsError):
    """A conditional write found the object changed (or present) since this mount saw it."""

    errno = errno.EIO


class NoSpace(FusefsError):
    """The staging area (the cache's disk) is full."""

    errno = errno.ENOSPC


class Exists(FusefsError):
    errno = errno.EEXIST


class NotEmpty(FusefsError):
    errno = errno.ENOTEMPTY


class CrossDevice(FusefsError):
    """A rename fusefs will not do in place (a folder above the limit): ``mv`` copies."""

    errno = errno.EXDEV


class NotPermitted(FusefsError):
    errno = errno.EPERM


class FileTooBig(FusefsError):
    """A size past what the staging area's file system can hold (EFBIG, as ext4 answers)."""

    errno = errno.EFBIG


class NameTooLong(FusefsError):
    errno = errno.ENAMETOOLONG


class TransientError(FusefsError):
    """A failure worth retrying: throttling, 5xx, connection reset, timeout."""

    errno = errno.EIO


class BackendError(FusefsError):
    """A non-retryable backend failure with no more specific meaning."""

    errno = errno.EIO


class UserError(FusefsError):
    """Bad input from the user: printed as one line, exit status non-zero, no traceback."""

    errno = errno.EINVAL


def error_kind(exc: BaseException) -> str:
    """The name another process sends for ``exc`` (see :func:`error_from_kind`): the class
    name of a fusefs error, ``OSError:<errno>`` for an OS error, else ``BackendError``."""
    if isinstance(exc, FusefsError):
        return type(exc).__name__
    if isinstance(exc, OSError) and exc.errno:
        return f"OSError:{exc.errno}"
    return "BackendError"


def _error_classes() -> dict[str, type[FusefsError]]:
    out: dict[str, type[FusefsError]] = {}
    todo: list[type[FusefsError]] = [FusefsError]
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return out


def error_from_kind(kind: str, message: str) -> Exception:
    """The exception :func:`error_kind` named, rebuilt with ``message``: it maps to the same
    errno as the original (a worker process's failure reads as an in-process one)."""
    if kind.startswith("OSError:"):
        try:
            return OSError(int(kind[8:]), message)
        except ValueError:
            return BackendError(message)
    return _error_classes().get(kind, BackendError)(message)


def first_error(exc: BaseException) -> BaseException:
    """The error that decides the errno of a (possibly nested) exception group.

    trio (>= 0.25) wraps an error raised inside a nursery in an ``ExceptionGroup``; the group
    itself means nothing to a caller. The first fusefs error wins (it carries the errno), then
    the first other leaf that is not a cancellation; a plain exception is returned as it is.
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    for leaf in leaves:
        if isinstance(leaf, FusefsError):
            return leaf
    for leaf in leaves:
        if type(leaf).__name__ != "Cancelled":
            return leaf
    return leaves[0] if leaves else exc


@contextlib.contextmanager
def single_error() -> Iterator[None]:
    """Re-raise an exception group from a nursery as the one error that matters (see
    :func:`first_error`), so ``except StaleVersion`` and errno mapping see the real error.

    A group of only cancellations is left alone: trio must see its own Cancelled.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        err = first_error(group)
        if type(err).__name__ == "Cancelled":
            raise
        raise err  # noqa: B904 - the leaf keeps its own cause and traceback


def to_errno(exc: BaseException) -> int:
    """Map any exception to the errno reported to the kernel; log the cause.

    This is the only place where failures become errno values.
    """
    exc = first_error(exc)
    if isinstance(exc, FusefsError):
        if exc.errno in (errno.ENOENT, errno.EROFS, errno.EISDIR, errno.ENOTDIR,
                         errno.ENAMETOOLONG):  # a program's own (bad) input: not a warning
            log.debug("%s: %s", type(exc).__name__, exc)
        elif exc.errno == errno.EINVAL:  # a user's bad input (e.g. a control command)
            log.info("%s: %s", type(exc).__name__, exc)
        else:
            log.warning("%s: %s", type(exc).__name__, exc, exc_info=exc.__cause__ is not None)
        return exc.errno
    if isinstance(exc, FileNotFoundError):
        log.debug("not found: %s", exc, exc_info=exc)
        return errno.ENOENT
    if isinstance(exc, PermissionError):
        log.warning("permission denied: %s", exc)
        return errno.EACCES
    if isinstance(exc, OSError) and exc.errno:
        log.warning("OS error: %s", exc)
        return exc.errno
    log.error("unexpected error: %r", exc, exc_info=exc)
    return errno.EIO
