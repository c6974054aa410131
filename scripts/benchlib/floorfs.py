"""A trivial read-only pyfuse3 filesystem: stock pyfuse3's ceiling for a cached epoch.

``python floorfs.py SRC MOUNTPOINT`` serves the regular files directly in ``SRC`` (read into
memory at start) as one flat folder, with what issue 19 asks of fusefs for a cached epoch and
nothing else: the kernel side mounted ``ro`` (no atime GETATTR), entry and attribute timeouts
that never end, ``keep_cache`` on every open (no READ once the pages are cached), and FLUSH
refused with ENOSYS (the kernel stops sending it). Each handler answers from memory without
awaiting. A cached file then costs the process OPEN and RELEASE, like fusefs's
``--read-only --metadata-ttl forever`` mount: the same reader on it gives the highest figure a
filesystem on stock pyfuse3 can reach on this machine. It stops on SIGTERM or an unmount.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FOREVER = 1e9


class FloorFS(pyfuse3.Operations):  # type: ignore[misc]
    def __init__(self, src: str) -> None:
        super().__init__()
        self.names: dict[bytes, int] = {}
        self.data: dict[int, bytes] = {}
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.attrs[pyfuse3.ROOT_INODE] = self._attr(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o555, 0)
        for i, name in enumerate(sorted(os.listdir(src)), pyfuse3.ROOT_INODE + 1):
            path = os.path.join(src, name)
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                self.data[i] = f.read()
            self.names[os.fsencode(name)] = i
            self.attrs[i] = self._attr(i, stat.S_IFREG | 0o444, len(self.data[i]))
        self.listing = sorted(self.names.items())

    @staticmethod
    def _attr(ino: int, mode: int, size: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.st_mode, a.st_size, a.st_nlink = ino, mode, size, 1
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_blksize, a.st_blocks = 4096, (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 1_700_000_000 * 10**9
        a.entry_timeout = a.attr_timeout = FOREVER
        return a

    async def lookup(self, parent_inode: int, name: bytes, ctx: object = None
                     ) -> pyfuse3.EntryAttributes:
        ino = self.names.get(name) if parent_inode == pyfuse3.ROOT_INODE else None
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs[ino]

    async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
        return self.attrs[inode]

    async def opendir(self, inode: int, ctx: object) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: object) -> None:
        for i in range(start_id, len(self.listing)):
            name, ino = self.listing[i]
            if not pyfuse3.readdir_reply(token, name, self.attrs[ino], i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.data[fh][off:off + size]

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)  # never again for this mount

    async def release(self, fh: int) -> None:
        return None


def main(argv: list[str]) -> int:
    src, mountpoint = argv[1], argv[2]
    fs = FloorFS(src)
    options = set(pyfuse3.default_options)
    options |= {"fsname=floorfs", "ro"}
    options.discard("default_permissions")
    pyfuse3.init(fs, mountpoint, options)

    async def stop_on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
