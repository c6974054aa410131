"""What the filesystem core hands around: nodes (what the kernel holds), entries for internal
users, attributes as the kernel sees them, open file and directory handles. No pyfuse3, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .backends.base import ObjectInfo
from .config import Settings
from .kinds import file_type
from .reader import SeqState

if TYPE_CHECKING:
    from .write.staged import StagedFile

#: The root folder's inode.
ROOT_INO = 1


def capped_mode(mode: int, settings: Settings) -> int:
    """A file mode from the bucket (metadata, a local file's mode) as the mount shows it: the
    owner's bits as they are; group and others get a bit only if ``--file-mode`` (read, write)
    or ``--dir-mode`` (execute) grants it to them; never setuid, setgid or sticky. So a bucket
    cannot make a file writable by every user of an ``--allow-other`` mount."""
    return mode & (0o700 | (settings.file_mode & 0o066) | (settings.dir_mode & 0o011))


def capped_dir_mode(mode: int, settings: Settings) -> int:
    """A folder's mode from its marker (or a local directory) as the mount shows it: the
    owner's bits as they are, group and others only what ``--dir-mode`` grants them, and
    the sticky bit (it only restricts: who may remove entries). Never setuid or setgid."""
    return mode & (0o1700 | (settings.dir_mode & 0o077))


def seen_type(node: Node, is_dir: bool, info: ObjectInfo | None) -> int:
    """The file type an observation says ``node`` has (a listing without metadata of the
    version the node has says nothing new: the node's own)."""
    if (not is_dir and info is not None and info.mode is None and info.meta_mtime is None
            and node.info is not None and node.info.version == info.version):
        return file_type(node.info)
    return file_type(None if is_dir else info)


class Node:
    """A file or directory the kernel holds (or an open handle refers to).

    Small on purpose (a walk of a million objects keeps a million nodes while the kernel
    holds them): a file's path is its info's key (the same string), a directory is a node
    without info."""

    __slots__ = ("ino", "_path", "info", "confirmed", "lookups")

    def __init__(self, ino: int, path: str, is_dir: bool, info: ObjectInfo | None,
                 confirmed: float) -> None:
        self.ino = ino
        # key relative to the mount root, no trailing slash ("" for the root): a file's is
        # ``info.key``, only folders keep their own
        self._path = path if is_dir or info is None or info.key != path else None
        self.info = None if is_dir else info
        self.confirmed = confirmed  # monotonic time of the observation ``info`` comes from
        self.lookups = 0

    @property
    def is_dir(self) -> bool:
        return self.info is None

    @property
    def path(self) -> str:
        if self._path is not None:
            return self._path
        assert self.info is not None
        return self.info.key

    @property
    def size(self) -> int:
        return self.info.size if self.info else 0


@dataclass(frozen=True, slots=True)
class Entry:
    """A path resolved for an internal user (the control file): not a node, holds nothing."""

    path: str
    is_dir: bool
    info: ObjectInfo | None = None


@dataclass
class Attr:
    """Attributes as the kernel sees them; converted to pyfuse3's type in fuse_ops."""

    ino: int
    mode: int
    size: int
    mtime_ns: int
    blocks: int
    blksize: int
    nlink: int
    uid: int
    gid: int
    #: a device node's number (0 for anything else)
    rdev: int = 0
    #: status change and access times (see :mod:`fusefs.foldermeta`); -1: as the mtime
    ctime_ns: int = -1
    atime_ns: int = -1


@dataclass
class Handle:
    node: Node
    info: ObjectInfo
    seq: SeqState = field(default_factory=SeqState)
    #: the staged file this handle writes (or reads: a file being written is read from it)
    staged: StagedFile | None = None
    writable: bool = False


@dataclass
class DirHandle:
    """An open directory: a snapshot of its entries, so readdir offsets stay stable and a big
    folder is listed and sorted once per ``opendir``, not once per kernel request."""

    node: Node
    entries: list[tuple[str, bool, ObjectInfo | None]] | None = None
    listed: float = 0.0
