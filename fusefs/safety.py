"""What fusefs does not trust, checked in one place: object keys from a bucket, URLs that may
carry credentials, directories on disk another user could have prepared, text bound for logs.

No imports of the rest of fusefs but errors: the backends, the write path and the mount all use
these.
"""

from __future__ import annotations

import logging
import os
import stat
from urllib.parse import urlsplit, urlunsplit

from .errors import InvalidArgument, UserError

#: Permission bits a file may have through the mount: never setuid, setgid or sticky.
PERM_BITS = 0o777


def clean_key(key: str) -> bool:
    """Is ``key`` (relative to the mount) made of names only: no empty, ``.`` or ``..``
    segment (a folder marker's one trailing ``/`` allowed)? An HTTP library would rewrite the
    URL of any other key (``a/../b`` becomes ``b``), so no request is ever sent for one."""
    if not key:
        return True
    parts = key.split("/")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    return all(p and p not in (".", "..") for p in parts)


def check_key(key: str) -> str:
    """``key`` itself if :func:`clean_key`; else InvalidArgument (no request is sent)."""
    if not clean_key(key):
        raise InvalidArgument(f"{key!r}: not a clean object key (empty, '.' or '..' segment)")
    return key


def redact_url(url: str | None) -> str | None:
    """``url`` without user info (``http://user:pass@host`` -> ``http://host``) or query
    string (a SAS token); None stays None."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "?"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_private_dir(path: str, what: str = "cache directory") -> None:
    """UserError (one line, as ssh does for ``~/.ssh``) unless ``path``, if it exists, is a real
    directory owned by this user and not writable by group or others: anything another user
    could have put in it (a journal, blocks, links) would be trusted with this user's rights."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"{what} {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(path)  # a link the user made to a cache elsewhere: judge its target
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {path}: not a directory")
    if st.st_uid != os.geteuid():
        raise UserError(f"{what} {path} is owned by uid {st.st_uid}, not by this user "
                        f"(uid {os.geteuid()}): refusing to trust it")
    if st.st_mode & 0o022:
        raise UserError(f"{what} {path} is writable by group or others (mode "
                        f"{st.st_mode & 0o7777:04o}): refusing to trust it (chmod 700 it)")


def check_cache_dir(cache_dir: str, staging: str = ".staging") -> None:
    """The cache directory, its staging directory and every directory in that (other mounts'
    staging directories) must be this user's own (:func:`check_private_dir`)."""
    check_private_dir(cache_dir)
    top = os.path.join(cache_dir, staging)
    check_private_dir(top, "staging directory")
    if os.path.isdir(top):
        for name in sorted(os.listdir(top)):
            d = os.path.join(top, name)
            if os.path.isdir(d) or os.path.islink(d):
                check_private_dir(d, "staging directory")


def escape(text: str) -> str:
    """``text`` with every non-printable character escaped as ``repr`` does (``\\n``,
    ``\\x1b``): an object key cannot start a forged line in a log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class SafeFormatter(logging.Formatter):
    """A Formatter whose messages cannot span lines: the message is :func:`escape`\\ d, and a
    traceback's lines are indented (no line of it can look like a log line of its own)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: object) -> str:  # noqa: N802
        text = super().formatException(ei)  # type: ignore[arg-type]
        return "\n".join("  " + escape(line) for line in text.split("\n"))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return "\n".join("  " + escape(line) for line in stack_info.split("\n"))
