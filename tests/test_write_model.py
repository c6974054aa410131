"""A model-based test of the write path (Hypothesis ``RuleBasedStateMachine``) on a real mount.

Rules are syscalls on a mount of SeaweedFS (create, write at an offset, truncate, rename of
files and of a folder, unlink, descriptors held open, read through them, ``fusefs sync``,
``kill -9`` and a remount, a store that refuses or cuts a share of the changes, pauses that
let the write-back delay pass while the proxy holds every PUT and DELETE a moment, so uploads
are in flight during the next rules, and a second mount of the bucket that replaces or removes
a name). The
model is a POSIX directory: names point at inodes, an inode
holds bytes. Invariants: the daemon never exits; a descriptor reads the bytes of the file it
opened (or ESTALE once that file left every name and the store); after ``fusefs sync`` the
bucket equals the model, with no conflict copy (the second mount changes a name only after
this one settled it, and this one sees the change once its metadata TTL has passed: concurrent
writers to one name are ``tests/test_write_races.py``'s).

CI runs it with a fixed seed and a small budget; ``scripts/soak-writes.sh`` runs it for as
long as asked, with new seeds (``FUSEFS_MODEL_EXAMPLES``, ``FUSEFS_MODEL_STEPS``,
``FUSEFS_MODEL_SEED``), and prints the seed of any failure.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
from conftest import Bucket, make_s3_bucket
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from test_writes import sync

EXAMPLES = int(os.environ.get("FUSEFS_MODEL_EXAMPLES", "6"))
STEPS = int(os.environ.get("FUSEFS_MODEL_STEPS", "30"))
SEED = int(os.environ.get("FUSEFS_MODEL_SEED", "17"))

NAMES = ["a", "b", "c"]
SUB = ["x", "y"]
TTL = 1.0  # this mount's --metadata-ttl: how long it may show a name another mount changed
data_st = st.binary(min_size=0, max_size=3000)


FIRST_FAILURE: list[str] = []  # the first failure's traceback: Hypothesis's replay of a
# failing example on a real mount may fail elsewhere (reported as flaky) and hide it


def _recorded(fn: Any) -> Any:
    """Keep the traceback of the first failing rule or invariant for the report."""
    @functools.wraps(fn)
    def wrapper(self: Any, **kwargs: Any) -> Any:
        steps = self.__dict__.setdefault("steps", [])
        if fn.__name__ != "daemon_alive":
            steps.append(f"{fn.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
        try:
            out = fn(self, **kwargs)
            history = self.__dict__.setdefault("history", {})
            for ino, content in self.__dict__.get("inodes", {}).items():
                history.setdefault(ino, set()).add(bytes(content))  # every version it had
            return out
        except BaseException:
            if not FIRST_FAILURE:
                FIRST_FAILURE.append(f"{fn.__name__}: {traceback.format_exc()}\nsteps of "
                                     f"{self.__dict__.get('top')}:\n" + "\n".join(steps))
            raise
    return wrapper


def _write_at(content: bytearray, offset: int, data: bytes) -> None:
    """The model of ``pwrite``: a write of nothing past the end does not extend the file."""
    if data:
        if len(content) < offset:
            content += bytes(offset - len(content))
        content[offset:offset + len(data)] = data


def _upload_or_delete(r: Any) -> bool:
    """Uploads and deletes (retried in the background), not the copies and folder markers
    a rename makes at once (a refused one fails the rename: EIO, as it should)."""
    if r.method == "DELETE":
        return not r.path.endswith("/")
    return (r.method in ("PUT", "POST") and not r.path.endswith("/")
            and r.header("x-amz-copy-source") is None)


def test_the_write_model(seaweed_server: Any, mount, tmp_path: Path) -> None:
    b: Bucket = make_s3_bucket(seaweed_server)
    client, bucket = b.extra["client"], b.extra["name"]
    cache = tmp_path / "model-cache"
    args = ("--block-size", "65536", "--metadata-ttl", str(TTL))
    current = {"m": mount(b, *args, cache_dir=cache)}
    others: list[Any] = []  # the second mount (another machine), started when first needed

    def other() -> Any:
        if not others:
            others.append(mount(b, "--block-size", "65536", "--metadata-ttl", "0",
                                cache_dir=tmp_path / "other-cache"))
        return others[0]
    counter = itertools.count()

    def bucket_files(prefix: str) -> dict[str, bytes]:
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                     Prefix=prefix):
            for o in page.get("Contents", []):
                if not o["Key"].endswith("/"):
                    body = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                    out[o["Key"][len(prefix):]] = body
        return out

    class WriteModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.top = f"ex{next(counter)}"
            self.inodes: dict[int, bytearray] = {}
            self.names: dict[str, int] = {}  # path below top -> inode
            self.handles: list[tuple[int, int]] = []  # (fd, inode)
            self.writers: list[tuple[int, int]] = []  # (fd, inode) open for writing
            self.folder = "d"
            self.ids = itertools.count()
            self.refusing = False

        @property
        def m(self) -> Any:
            return current["m"]

        def p(self, rel: str) -> Path:
            return self.m.path / self.top / rel

        def paths(self) -> list[str]:
            return NAMES + [f"{self.folder}/{n}" for n in SUB]

        @initialize()
        def setup(self) -> None:
            os.makedirs(self.p(self.folder))

        # --- file contents ------------------------------------------------------------

        @rule(i=st.integers(0, 4), data=data_st, truncate=st.booleans())
        @_recorded
        def write_file(self, i: int, data: bytes, truncate: bool) -> None:
            rel = self.paths()[i]
            with open(self.p(rel), "wb" if truncate else "ab") as f:
                f.write(data)
            ino = self.names.get(rel)
            if ino is None:
                ino = self.names[rel] = next(self.ids)
                self.inodes[ino] = bytearray()
            if truncate:
                self.inodes[ino][:] = data
            else:
                self.inodes[ino] += data

        @precondition(lambda self: self.names)
        @rule(pick=st.integers(0, 100), offset=st.integers(0, 5000), data=data_st)
        @_recorded
        def pwrite(self, pick: int, offset: int, data: bytes) -> None:
            rel = sorted(self.names)[pick % len(self.names)]
            fd = os.open(self.p(rel), os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
            _write_at(self.inodes[self.names[rel]], offset, data)

        @precondition(lambda self: self.names)
        @rule(pick=st.integers(0, 100), size=st.integers(0, 6000))
        @_recorded
        def truncate(self, pick: int, size: int) -> None:
            rel = sorted(self.names)[pick % len(self.names)]
            os.truncate(self.p(rel), size)
            content = self.inodes[self.names[rel]]
            if size < len(content):
                del content[size:]
            else:
                content += bytes(size - len(content))

        # --- names --------------------------------------------------------------------

        @precondition(lambda self: self.names)
        @rule(pick=st.integers(0, 100), j=st.integers(0, 4))
        @_recorded
        def rename(self, pick: int, j: int) -> None:
            src = sorted(self.names)[pick % len(self.names)]
            dst = self.paths()[j]
            os.rename(self.p(src), self.p(dst))
            if src != dst:
                self.names[dst] = self.names.pop(src)

        @precondition(lambda self: self.names)
        @rule(pick=st.integers(0, 100))
        @_recorded
        def unlink(self, pick: int) -> None:
            rel = sorted(self.names)[pick % len(self.names)]
            os.unlink(self.p(rel))
            del self.names[rel]

        @rule()
        @_recorded
        def rename_folder(self) -> None:
            other = "e" if self.folder == "d" else "d"
            os.rename(self.p(self.folder), self.p(other))
            for rel in [r for r in self.names if r.startswith(self.folder + "/")]:
                self.names[other + rel[1:]] = self.names.pop(rel)
            self.folder = other

        # --- descriptors ----------------------------------------------------------------

        @precondition(lambda self: self.names and len(self.handles) < 4)
        @rule(pick=st.integers(0, 100))
        @_recorded
        def open_handle(self, pick: int) -> None:
            rel = sorted(self.names)[pick % len(self.names)]
            self.handles.append((os.open(self.p(rel), os.O_RDONLY), self.names[rel]))

        @precondition(lambda self: self.handles)
        @rule(pick=st.integers(0, 100), offset=st.integers(0, 6000))
        @_recorded
        def read_handle(self, pick: int, offset: int) -> None:
            fd, ino = self.handles[pick % len(self.handles)]
            expected = bytes(self.inodes[ino][offset:offset + 4096])
            try:
                got = os.pread(fd, 4096, offset)
            except OSError as e:
                # only a file that lost every name may be gone from the store
                assert e.errno == errno.ESTALE and ino not in self.names.values(), e
                return
            assert got == expected, f"a descriptor read other bytes than its file's at {offset}"

        @precondition(lambda self: self.handles)
        @rule(pick=st.integers(0, 100))
        @_recorded
        def close_handle(self, pick: int) -> None:
            fd, _ = self.handles.pop(pick % len(self.handles))
            os.close(fd)

        @precondition(lambda self: self.names and len(self.writers) < 3)
        @rule(pick=st.integers(0, 100))
        @_recorded
        def open_writer(self, pick: int) -> None:
            rel = sorted(self.names)[pick % len(self.names)]
            self.writers.append((os.open(self.p(rel), os.O_RDWR), self.names[rel]))

        @precondition(lambda self: self.writers)
        @rule(pick=st.integers(0, 100), offset=st.integers(0, 5000), data=data_st,
              fsync=st.booleans())
        @_recorded
        def write_through_writer(self, pick: int, offset: int, data: bytes, fsync: bool) -> None:
            fd, ino = self.writers[pick % len(self.writers)]
            os.pwrite(fd, data, offset)
            _write_at(self.inodes[ino], offset, data)
            if fsync and ino in self.names.values():
                try:  # in the store now: its version changes under the other rules
                    os.fsync(fd)
                except OSError as e:  # or EIO while the store refuses (the data is kept)
                    assert e.errno == errno.EIO and self.refusing, e

        @precondition(lambda self: self.writers)
        @rule(pick=st.integers(0, 100))
        @_recorded
        def close_writer(self, pick: int) -> None:
            fd, _ = self.writers.pop(pick % len(self.writers))
            os.close(fd)

        # --- durability -------------------------------------------------------------------

        @precondition(lambda self: not self.writers)
        @rule()
        @_recorded
        def sync_and_compare(self) -> None:
            assert b.proxy is not None
            b.proxy.faults(0)  # the store takes changes again: sync must then succeed
            self.refusing = False
            r = sync(self.m)
            assert r.returncode == 0, r.stderr
            want = {rel: bytes(self.inodes[ino]) for rel, ino in self.names.items()}
            got = bucket_files(self.top + "/")
            assert {k: got.get(k) for k in want} == want, (sorted(got), sorted(want))
            # a removed file that a descriptor still reads stays until its last close, as the
            # version last uploaded (a change made just before the unlink is never sent)
            history = self.__dict__.get("history", {})
            held = {v for _, ino in self.handles + self.writers
                    for v in history.get(ino, set()) | {bytes(self.inodes[ino])}}
            extra = {k: v for k, v in got.items() if k not in want}
            assert all(v in held for v in extra.values()), sorted(extra)

        @rule()
        @_recorded
        def kill_9_and_remount(self) -> None:
            for fd, _ in self.handles + self.writers:
                os.close(fd)
            self.handles.clear()
            self.writers.clear()
            m = self.m
            assert m.proc is not None
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait()
            m.stop()
            current["m"] = mount(b, *args, cache_dir=cache)
            for rel, ino in self.names.items():
                assert self.p(rel).read_bytes() == bytes(self.inodes[ino]), rel

        # --- another machine -------------------------------------------------------------

        def _settled_then(self, change: Any) -> None:
            """Settle this mount (sync, compared), let the other mount make ``change`` and sync
            it (no conflict: it saw the settled version), then wait out this mount's TTL."""
            self.sync_and_compare()
            o = other()
            change(o.path / self.top)
            r = sync(o)
            assert r.returncode == 0, r.stderr
            assert o.stats()["conflicts"] == 0
            time.sleep(TTL + 0.3)

        @precondition(lambda self: not self.writers)
        @rule(i=st.integers(0, 4), data=data_st)
        @_recorded
        def other_mount_replaces(self, i: int, data: bytes) -> None:
            """Another machine writes a name: this mount then shows its bytes (a new file: a
            descriptor held on the old one reads the old bytes or gets ESTALE), and its next
            changes start from that version (no conflict copy)."""
            rel = self.paths()[i]
            self._settled_then(lambda top: (top / rel).write_bytes(data))
            ino = self.names[rel] = next(self.ids)
            self.inodes[ino] = bytearray(data)
            assert self.p(rel).read_bytes() == data

        @precondition(lambda self: self.names and not self.writers)
        @rule(pick=st.integers(0, 100))
        @_recorded
        def other_mount_removes(self, pick: int) -> None:
            """Another machine removes a name: this mount then shows it absent."""
            rel = sorted(self.names)[pick % len(self.names)]
            self._settled_then(lambda top: os.unlink(top / rel))
            del self.names[rel]
            assert not self.p(rel).exists()

        @rule(rate=st.sampled_from([0.0, 0.3, 1.0]), reset=st.booleans())
        @_recorded
        def store_refuses(self, rate: float, reset: bool) -> None:
            """The store refuses (503) or cuts (a reset connection) a share of the uploads and
            deletes from now on: they stay journaled and are retried."""
            assert b.proxy is not None
            b.proxy.faults(rate, ["reset"] if reset else ["503"], seed=next(self.ids),
                           predicate=_upload_or_delete)
            self.refusing = rate > 0

        @rule(seconds=st.sampled_from([0.4, 1.2]))
        @_recorded
        def pause(self, seconds: float) -> None:
            """Let the write-back delay pass: uploads start (and, held by the proxy, are in
            flight during the next rules)."""
            time.sleep(seconds)

        @invariant()
        @_recorded
        def daemon_alive(self) -> None:
            m = self.m
            assert m.proc is not None and m.proc.poll() is None, "the daemon exited"

        def teardown(self) -> None:
            for fd, _ in self.handles + self.writers:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.writers.clear()
            if self.m.proc is not None and self.m.proc.poll() is None:
                self.sync_and_compare()

    machine_settings = settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
        suppress_health_check=list(HealthCheck), database=None,
        phases=[Phase.generate, Phase.shrink] if os.environ.get("FUSEFS_MODEL_SHRINK")
        else [Phase.generate], print_blob=True)
    assert b.proxy is not None
    # every change of the bucket takes a while: uploads and deletes overlap the next rules
    b.proxy.slow(lambda method, path: method in ("PUT", "POST", "DELETE"), 0.3)
    try:
        run_state_machine_as_test(seed(SEED)(WriteModel), settings=machine_settings)
    except BaseException:
        print(f"FUSEFS_MODEL_SEED={SEED} reproduces this failure")
        if FIRST_FAILURE:
            print("--- the first failure (before Hypothesis replayed the example)")
            print(FIRST_FAILURE[0])
        with contextlib.suppress(Exception):
            keep = os.environ.get("FUSEFS_MODEL_KEEP_LOGS")
            if keep:  # every mount's log of this run, for the post-mortem
                shutil.copytree(tmp_path, keep, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("mnt*", "model-cache"))
            print("--- the mount's log (last 200 lines)")
            print("\n".join(current["m"].log_text().splitlines()[-200:]))
        raise
    finally:
        b.proxy.slow(None, 0)
        b.proxy.faults(0)


pytestmark = pytest.mark.timeout(1800)
