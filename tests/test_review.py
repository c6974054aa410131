"""Defects found in review (issue 8) that live in the mount's core: each test failed before its fix.

Real mounts over the local backend and moto (through the counting proxy); no timing assertions.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import trio
from conftest import Bucket, blob, drop_page_cache

from fusefs.backends.base import ListPage, ObjectInfo
from fusefs.backends.local import LocalStore
from fusefs.cache.blocks import NullBlockStore
from fusefs.cli_control import send_command
from fusefs.config import Settings
from fusefs.errors import AccessDenied, StaleVersion, first_error, single_error, to_errno
from fusefs.fs import FileSystem
from fusefs.reader import Reader, SeqState
from fusefs.stats import Stats

KiB = 1024


def _command(mp: Path, line: str) -> None:
    with open(mp / ".fusefs", "w") as f:
        f.write(line + "\n")


# --- read-only mounts take control commands (item 2) --------------------------------------


def test_read_only_mount_accepts_control_commands(local_bucket: Bucket, mount) -> None:
    local_bucket.put("d/a.bin", blob(100 * KiB))
    m = mount(local_bucket, "--read-only")
    assert (m.path / "d/a.bin").read_bytes() == blob(100 * KiB)
    # the kernel mount is ro (issue 19): commands take the control socket the stats name
    with pytest.raises(OSError) as ei:
        _command(m.path, "clear")
    assert ei.value.errno == errno.EROFS
    send_command(str(m.path), ["clear"])
    assert m.stats()["current_count"] == 0
    send_command(str(m.path), ["prefetch", "d"])
    send_command(str(m.path), ["cancel-prefetch"])
    with open("/proc/mounts") as f:
        opts = next(line.split()[3] for line in f if line.split()[1] == str(m.path))
    assert "ro" in opts.split(",")
    for attempt in (lambda: open(m.path / "d/a.bin", "r+b"), lambda: os.mkdir(m.path / "x"),
                    lambda: open(m.path / "new", "wb")):
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EROFS
    assert os.stat(m.path / "d/a.bin").st_mode & 0o222 == 0  # no write bits shown


# --- errors raised inside nurseries keep their errno (item 5) -----------------------------


def test_first_error_unwraps_groups() -> None:
    stale = StaleVersion("changed")
    group = ExceptionGroup("g", [ExceptionGroup("h", [ValueError("x"), stale])])
    assert first_error(group) is stale
    assert to_errno(group) == errno.ESTALE
    with pytest.raises(StaleVersion), single_error():
        raise group


class _Refusing:
    """A real local store whose every call is refused, as a bucket policy would."""

    def __init__(self, root: Path) -> None:
        self.inner = LocalStore(str(root))
        self.source_id = self.inner.source_id

    def check(self) -> None:
        return None

    def head(self, key: str) -> ObjectInfo:
        raise AccessDenied(f"{key}: denied")

    def list(self, prefix: str, *, max_keys: int | None = None,  # type: ignore[no-untyped-def]
             start_after: str = ""):
        raise AccessDenied(f"{prefix}: denied")
        yield ListPage()

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        raise AccessDenied(f"{key}: denied")


def test_probe_refused_is_eacces_not_eio(tmp_path: Path) -> None:
    store = _Refusing(tmp_path)
    settings = Settings(cache_size=0)
    reader = Reader(store, NullBlockStore(), Stats(), block_size=64 * KiB, workers=2,
                    readahead_max=64 * KiB)
    fs = FileSystem(store, reader, settings)

    async def main() -> None:
        await fs.lookup(1, "x")

    with pytest.raises(AccessDenied):  # an ExceptionGroup (EIO) before
        trio.run(main)


def test_random_reads_of_a_changed_object_are_estale(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    root.mkdir()
    (root / "f.bin").write_bytes(blob(1024 * KiB))
    store = LocalStore(str(root))
    reader = Reader(store, NullBlockStore(), Stats(), block_size=512 * KiB, workers=4,
                    readahead_max=512 * KiB)
    info = store.head("f.bin")
    tmp = root / "f.tmp"
    tmp.write_bytes(blob(1024 * KiB, seed=9))
    os.replace(tmp, root / "f.bin")

    async def main() -> None:
        seq = SeqState()
        seq.random = True
        await reader.read(info, 300 * KiB, 200 * KiB, seq)  # spans two random units

    with pytest.raises(StaleVersion):  # an ExceptionGroup (EIO) before
        trio.run(main)


def test_changed_object_under_random_reads_is_estale_on_a_mount(s3_bucket: Bucket, mount) -> None:
    data = blob(2048 * KiB, seed=1)
    s3_bucket.put("r.bin", data)
    m = mount(s3_bucket, "--block-size", "1M")
    rng = random.Random(5)
    with open(m.path / "r.bin", "rb") as f:
        for _ in range(6):  # jumping reads: the handle goes into random mode
            off = rng.randrange(0, 1900) * KiB
            f.seek(off)
            assert f.read(4 * KiB) == data[off : off + 4 * KiB]
        s3_bucket.put("r.bin", blob(2048 * KiB, seed=2))
        drop_page_cache(m.path / "r.bin")
        _command(m.path, "clear")
        f.seek(1000 * KiB + 123)
        with pytest.raises(OSError) as ei:
            f.read(200 * KiB)  # two random units: fetched in a nursery
        assert ei.value.errno == errno.ESTALE


# --- no handler error ends the mount (item 8) ----------------------------------------------


class _BrokenIndex(NullBlockStore):
    """A block store whose index fails, as a locked or damaged SQLite file does."""

    def volume(self) -> int:
        import sqlite3

        raise sqlite3.OperationalError("database is locked")

    count = volume  # type: ignore[assignment]


def test_handlers_turn_any_error_into_an_errno(tmp_path: Path) -> None:
    import pyfuse3

    from fusefs.control import Control
    from fusefs.fuse_ops import FuseOperations
    from fusefs.mount import Mount, safe_status_text

    store = LocalStore(str(tmp_path))
    blocks = _BrokenIndex()
    settings = Settings(cache_size=0)
    stats = Stats()
    reader = Reader(store, blocks, stats, block_size=64 * KiB, workers=2, readahead_max=64 * KiB)
    fs = FileSystem(store, reader, settings)
    control = Control(fs, reader, blocks, stats, settings, "file://x")
    ops = FuseOperations(fs, control)
    with pytest.raises(pyfuse3.FUSEError) as ei:  # sqlite3.OperationalError before
        trio.run(ops.statfs, None)
    assert ei.value.errno == errno.EIO
    trio.run(ops.forget, [(12345, 1)])  # unknown inode: logged, never raised
    m = Mount("file://x", "/mnt", Settings(cache_size=1 << 30), store, blocks, stats, reader,
              fs, control, ops)
    assert "unavailable" in safe_status_text(m)  # the systemd STATUS loop keeps going


# --- modes in the config file are octal (item 10) ------------------------------------------


def test_file_mode_in_config_is_octal_and_bare_integers_are_refused(tmp_path: Path) -> None:
    from fusefs.config import load_settings
    from fusefs.errors import UserError

    cfg = tmp_path / "c.toml"
    cfg.write_text('file_mode = "0640"\ndir_mode = "750"\n')
    s = load_settings(env={}, config_path=str(cfg))
    assert (s.file_mode, s.dir_mode) == (0o640, 0o750)
    cfg.write_text("file_mode = 644\n")  # read as decimal 644 = 0o1204 before
    with pytest.raises(UserError, match='file_mode=644 in .*octal string in quotes, e.g. "0644"'):
        load_settings(env={}, config_path=str(cfg))
    cfg.write_text('file_mode = "0986"\n')
    with pytest.raises(UserError, match="not an octal file mode"):
        load_settings(env={}, config_path=str(cfg))
    assert load_settings(cli={"file_mode": "0o600"}, env={}).file_mode == 0o600
