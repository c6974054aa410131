"""Hint streams (``hint-open``/``hint``/``hint-at``/``hint-cancel``) and ``fusefs.loader``, on
real mounts of moto S3 behind the counting proxy. The server's request log is the evidence; a
gate holds selected GETs at the server where a test needs work to stay queued. No timings.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import Bucket, MountProc, blob
from test_control import command, gets, ok, wait_for

from fusefs.loader import HintError, HintingSampler, HintWindowWarning, MountHints

KiB = 1024
BLOCK = 256 * KiB


def wait(cond: Any, what: str) -> None:
    """Wait for ``cond`` with a generous bound: the machine may be loaded (not a timing)."""
    wait_for(cond, what, timeout=120)


def stream_state(m: MountProc, sid: str) -> dict[str, Any] | None:
    return next((s for s in m.stats()["hint_streams"] if s["id"] == sid), None)


def settled(state: dict[str, Any] | None) -> int:
    """Files of a stream fetched, or found cached: on S3 a hinted file of at most
    --link-probe-size bytes is fetched whole by its lookup (which learns whether it is a link:
    fusefs.kinds), so the prefetcher finds it cached."""
    s = state or {}
    return int(s.get("files_done", 0)) + int(s.get("files_cached", 0))


def done_or_cached(m: MountProc, sid: str) -> int:
    return settled(stream_state(m, sid))


def get_keys(bucket: Bucket, under: str = "") -> list[str]:
    """Keys of the object GETs the server saw, in the order they arrived."""
    name = bucket.extra["name"]
    return [r.path[len(name) + 2 :] for r in gets(bucket, under)]


def fuse_counts(m: MountProc) -> dict[str, int]:
    """FUSE requests the mount answered, by kind. Reading them is itself one LOOKUP, OPEN,
    READ, FLUSH and RELEASE of the control file (counted in the answer)."""
    counts: dict[str, int] = m.stats()["fuse_requests"]
    return counts


def delta(after: dict[str, int], before: dict[str, int], kind: str) -> int:
    return after.get(kind, 0) - before.get(kind, 0)


def seed(bucket: Bucket, names: list[str], size: int = BLOCK) -> dict[str, bytes]:
    data = {k: blob(size - i % 7, i) for i, k in enumerate(names)}
    for k, v in data.items():
        bucket.put(k, v)
    return data


def test_hinted_files_are_fetched_in_order_then_read_without_gets(
    s3_bucket: Bucket, mount
) -> None:
    names = [f"ds/{i:03d}.bin" for i in range(30)]
    data = seed(s3_bucket, names)
    # not hinted, never fetched: above --link-probe-size (a listing of the folder fetches
    # objects up to that size whole on S3, to learn whether they are links: fusefs.kinds)
    s3_bucket.put("ds/other.bin", b"x" * 5000)
    # --workers 3: one prefetch task, so GETs reach the server exactly in the stream's order
    m = mount(s3_bucket, "--block-size", str(BLOCK), "--workers", "3")
    order = names[:]
    random.Random(5).shuffle(order)
    with MountHints(m.path, window_files=64, stream="epoch") as hints:
        opened = hints.start(order)
        assert opened["window_files"] == 64 and opened["limited_by_cache"] is False
        wait(lambda: (stream_state(m, "epoch") or {}).get("files_done") == 30, "hints")
        assert get_keys(s3_bucket) == order  # in order, each once, nothing else
        before = len(gets(s3_bucket))
        for k in order:
            assert (m.path / k).read_bytes() == data[k]
        assert len(gets(s3_bucket)) == before  # every hinted file read with 0 GETs
        state = stream_state(m, "epoch")
        assert state is not None
        assert (state["files"], state["files_hinted"], state["files_pending"]) == (30, 30, 0)
        assert state["bytes_done"] == sum(len(v) for v in data.values())
        assert m.stats()["hint_window_limited"] is False
    assert stream_state(m, "epoch") is None  # closed with the context


def test_a_new_order_or_an_abandoned_epoch_drops_queued_hints(s3_bucket: Bucket, mount) -> None:
    proxy = s3_bucket.proxy
    assert proxy is not None
    old = [f"a/{i}.bin" for i in range(10)]
    new = [f"b/{i}.bin" for i in range(5)]
    later = [f"c/{i}.bin" for i in range(8)]
    seed(s3_bucket, old + new + later)
    m = mount(s3_bucket, "--block-size", str(BLOCK), "--workers", "3")
    gate = threading.Event()
    held = f"/{s3_bucket.extra['name']}/a/"
    proxy.slow(lambda method, path: method == "GET" and path.startswith(held) and
               not gate.wait(60), 0.001)  # fmt: skip
    try:
        hints = MountHints(m.path, window_files=100, stream="s")
        hints.start(old)
        wait(lambda: gets(s3_bucket, "a/"), "the first hinted GET")
        wait(lambda: (stream_state(m, "s") or {}).get("files_queued") == 10, "the window queued")
        replaced = hints.start(new)  # a new order: the old one's queued files are dropped
        assert replaced["replaced"]["files_cancelled"] == 9
    finally:
        gate.set()
        proxy.slow(None, 0)
    wait(lambda: (stream_state(m, "s") or {}).get("files_done") == 5, "the new order")
    assert get_keys(s3_bucket, "a/") == ["a/0.bin"]  # the dropped files never reached it
    assert get_keys(s3_bucket, "b/") == new
    hints.close()

    # a sampler's epoch abandoned mid-way (break) cancels its stream and queued hints
    gate.clear()
    held = f"/{s3_bucket.extra['name']}/c/"
    proxy.slow(lambda method, path: method == "GET" and path.startswith(held) and
               not gate.wait(60), 0.001)  # fmt: skip
    try:
        sampler = HintingSampler(range(8), later, m.path, window_files=100, stream="sampler")
        it = iter(sampler)
        assert next(it) == 0
        wait(lambda: gets(s3_bucket, "c/"), "the sampler's first hinted GET")
        it.close()  # the epoch ends early
        assert stream_state(m, "sampler") is None
    finally:
        gate.set()
        proxy.slow(None, 0)
    wait(lambda: all(r["state"] == "finished" for r in m.stats()["prefetch_requests"]),
             "the cancelled stream to finish")  # fmt: skip
    assert get_keys(s3_bucket, "c/") == ["c/0.bin"]
    assert m.stats()["prefetch_cancelled"] == 9 + 7


def test_window_is_bounded_by_the_cache_and_never_evicts_unread_hints(
    s3_bucket: Bucket, mount
) -> None:
    """48 files of 256 KiB (12 MiB) through an 8 MiB cache, read in order while the window
    moves on: each file is fetched once (a hinted file evicted before its read would be
    fetched again) and every read is served with no GET."""
    names = [f"big/{i:03d}.bin" for i in range(48)]
    data = seed(s3_bucket, names)
    m = mount(s3_bucket, "--block-size", str(BLOCK), "--cache-size", "8M")
    hints = MountHints(m.path, window_files=24, window_bytes=1 << 30, stream="w")
    with pytest.warns(HintWindowWarning, match="does not fit the cache"):
        opened = hints.start(names)
    cap = (8 * 1024 * KiB - 4 * BLOCK) // 2
    assert opened["window_bytes"] == cap and opened["limited_by_cache"] is True
    assert m.stats()["hint_window_limited"] is True
    for i, k in enumerate(names):
        def ready(i: int = i) -> bool:  # file i fetched, and nothing queued in flight
            s = stream_state(m, "w") or {}
            return s.get("files_pending") == 0 and s.get("files_done", 0) > i

        wait(ready, f"file {i} hinted")
        s = stream_state(m, "w")
        assert s is not None and s["bytes_in_window"] <= cap, s
        assert get_keys(s3_bucket, k) == [k]  # fetched by the hints
        assert (m.path / k).read_bytes() == data[k]
        assert get_keys(s3_bucket, k) == [k], f"{k} was not in the cache when read"
        hints.advance(i + 1)
    assert sorted(get_keys(s3_bucket)) == names  # each file fetched exactly once
    st = m.stats()
    assert st["evictions"] > 0  # the cache really was too small for the whole epoch
    hints.close()

    # no byte window asked for: the daemon finds out from the sizes that the cache limits it
    hints = MountHints(m.path, window_files=40, stream="w2")
    assert hints.start(names)["limited_by_cache"] is False
    wait(lambda: (stream_state(m, "w2") or {}).get("limited_by_cache") is True, "the cap")
    with pytest.warns(HintWindowWarning, match=r"holds only \d+ of the 40 files"):
        hints.advance(5)
    hints.close()


def test_sampler_drives_one_stream_for_many_readers(s3_bucket: Bucket, mount) -> None:
    """A DataLoader-like consumer: the sampler is iterated in one place, 4 reader threads
    read the files of the indices it hands out; two epochs reuse one stream."""
    names = [f"s/{i:03d}.bin" for i in range(40)]
    data = seed(s3_bucket, names, 64 * KiB)
    m = mount(s3_bucket, "--block-size", str(BLOCK))

    class Shuffled:
        def __init__(self) -> None:
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __len__(self) -> int:
            return len(names)

        def __iter__(self) -> Any:
            order = list(range(len(names)))
            random.Random(self.epoch).shuffle(order)
            return iter(order)

    sampler = HintingSampler(Shuffled(), names, m.path, window_files=8, lookahead=4,
                             stream="train")  # fmt: skip
    assert len(sampler) == 40
    for epoch in range(2):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert sorted(indices) == list(range(40))
        assert indices != list(range(40))
        got: dict[int, bytes] = {}

        def read(chunk: list[int], got: dict[int, bytes] = got) -> None:
            got.update({i: (m.path / names[i]).read_bytes() for i in chunk})

        threads = [threading.Thread(target=read, args=(indices[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(got[i] == data[names[i]] for i in range(40))
        state = stream_state(m, "train")
        assert state is not None and state["files"] == 40
        assert state["window_files"] == 8 + 4 and state["position"] == 40 - 4
    assert len(gets(s3_bucket, "s/")) == 40  # hinted or read, each file fetched once


def test_hint_commands_refuse_bad_input(s3_bucket: Bucket, mount, tmp_path: Path) -> None:
    s3_bucket.put("f.bin", b"f")
    m = mount(s3_bucket, "--block-size", str(BLOCK))
    bad = {
        "hint-open": "usage",
        "hint-open 'bad id'": "stream id",
        "hint-open s 0": "at least one file",
        "hint-open s 4 lots": "not a size",
        "hint nosuch f.bin": "no hint stream",
        "hint-at nosuch 3": "no hint stream",
        "hint-cancel nosuch": "no hint stream",
    }
    for line, text in bad.items():
        err, result = command(m.path, (line + "\n").encode())
        assert err == errno.EINVAL and text in result["error"], (line, result)
    ok(m.path, "hint-open s 4 1M")
    err, result = command(m.path, b"hint s ../x\n")
    assert err == errno.EINVAL and "outside" in result["error"]
    # a path that does not exist is counted, not fatal; the next ones are hinted
    assert ok(m.path, "hint s missing.bin f.bin")["files"] == 2
    wait(lambda: done_or_cached(m, "s") == 1, "f.bin")
    state = stream_state(m, "s")
    assert state is not None and (state["files_missing"], state["files_hinted"]) == (1, 1)
    assert ok(m.path, "hint-cancel s")["files_cancelled"] == 0
    with pytest.raises(HintError, match="not a fusefs mount"):
        MountHints(tmp_path).start(["x"])


def test_hints_need_the_cache(tmp_path: Path, mount) -> None:
    from conftest import make_local_bucket

    bucket = make_local_bucket(tmp_path / "objects")
    bucket.put("f.bin", b"data")
    m = mount(bucket, "--cache-size", "0", cache_dir=tmp_path / "none")
    with pytest.raises(HintError, match="disabled") as ei:
        MountHints(m.path).start(["f.bin"])
    assert ei.value.errno == errno.EINVAL


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed (scripts/setup.sh installs torch==2.13.0+cpu where that "
    "wheel lies on disk; it could not here)",
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: no numpy; more workers than cores
def test_torch_dataloader_with_hinting_sampler(s3_bucket: Bucket, mount) -> None:
    """The README's recipe, with torch's own DataLoader and 4 worker processes on a real
    mount: every file is fetched once (hinted, in the sampler's process), the sampler's
    listing of the folder spares the workers' opens a LOOKUP each, and the control file is
    closed with the sampler. Counted, never timed."""
    import torch
    from torch.utils.data import DataLoader, Dataset, RandomSampler

    names = [f"t/{i:03d}.bin" for i in range(64)]
    data = seed(s3_bucket, names, 16 * KiB)
    m = mount(s3_bucket, "--block-size", str(BLOCK))

    class Files(Dataset):  # type: ignore[type-arg]
        def __init__(self, root: Path, paths: list[str]) -> None:
            self.root, self.paths = root, paths

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, i: int) -> Any:
            body = (self.root / self.paths[i]).read_bytes()
            ok = body == data[self.paths[i]]
            return torch.tensor([i, os.getpid(), int(ok)])

    ds = Files(m.path, names)
    sampler = HintingSampler(RandomSampler(ds), ds.paths, m.path, window_files=16,
                             lookahead=2 * 4 * 8)  # fmt: skip
    loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=4)
    before = fuse_counts(m)
    rows = torch.cat(list(loader)).tolist()
    after = fuse_counts(m)
    assert sorted(r[0] for r in rows) == list(range(64))  # every index once
    assert all(r[2] == 1 for r in rows)  # every file's bytes right
    pids = {r[1] for r in rows}
    assert os.getpid() not in pids and len(pids) == 4  # read in the 4 worker processes
    assert len(gets(s3_bucket, "t/")) == 64  # each file fetched once
    assert sampler.hints().folders_listed == 1  # "t", listed once in this process
    assert delta(after, before, "readdir") >= 1
    # the workers' 64 opens found the listing's dentries: no LOOKUP but the control file's
    # (opened by the stream and by fuse_counts) and the folder's own (once, to list it)
    assert delta(after, before, "lookup") <= 3, (before, after)
    assert delta(after, before, "open") >= 64
    control = str(m.path / ".fusefs")
    assert control in open_files()  # the stream's control file, until closed
    sampler.close()
    assert control not in open_files()  # the mount can be unmounted now


def test_listing_the_folders_of_an_order_spares_a_lookup_per_open(
    s3_bucket: Bucket, mount
) -> None:
    """``MountHints.start`` lists each folder of the order once: the READDIRPLUS answers fill
    the kernel's dentries, so opening the order's files sends no LOOKUP. Without the listing,
    each open looks its file up."""
    listed = [f"l/{i:02d}.bin" for i in range(40)]
    unlisted = [f"n/{i:02d}.bin" for i in range(40)]
    data = seed(s3_bucket, listed + unlisted, 4 * KiB)
    m = mount(s3_bucket, "--block-size", str(BLOCK))
    for order, list_folders in ((listed, True), (unlisted, False)):
        with MountHints(m.path, window_files=64, list_folders=list_folders) as hints:
            hints.start(order)
            assert hints.folders_listed == (1 if list_folders else 0)
            # files of at most --link-probe-size are fetched whole by the listing or the
            # lookup (S3: learning their type, fusefs.kinds): the prefetcher finds them cached
            wait(lambda h=hints: settled(h.stats()) == 40, "hints")
            before = fuse_counts(m)
            for k in order:
                assert (m.path / k).read_bytes() == data[k]
            after = fuse_counts(m)
        lookups = delta(after, before, "lookup") - 1  # less the control file's own
        if list_folders:
            assert lookups == 0, (before, after)
        else:
            assert lookups >= 40, (before, after)  # the folder, and each file
    assert len(gets(s3_bucket)) == 80  # hinted: each file fetched once


def test_demand_reads_are_not_queued_behind_held_hints(s3_bucket: Bucket, mount) -> None:
    """The hinted GETs are held at the server, the window queued behind them: programs' reads
    still get all ``--workers`` slots (3 reads reach the server at once beside the held hint)
    and complete while the hints stay held; no further hint starts while they wait."""
    proxy = s3_bucket.proxy
    assert proxy is not None
    hinted = [f"h/{i:02d}.bin" for i in range(20)]
    demand = [f"d/{i}.bin" for i in range(3)]
    data = seed(s3_bucket, hinted + demand)
    m = mount(s3_bucket, "--block-size", str(BLOCK), "--workers", "3")
    hint_gate, demand_gate = threading.Event(), threading.Event()
    name = s3_bucket.extra["name"]

    def hold(method: str, path: str) -> bool:
        if method == "GET" and path.startswith(f"/{name}/h/"):
            hint_gate.wait(60)
        elif method == "GET" and path.startswith(f"/{name}/d/"):
            demand_gate.wait(60)
        return False  # the wait is the hold; no delay on top

    proxy.slow(hold, 0.001)
    got: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda k=k: got.update({k: (m.path / k).read_bytes()}))
               for k in demand]  # fmt: skip
    try:
        hints = MountHints(m.path, window_files=64, stream="held")
        hints.start(hinted)
        wait(lambda: len(gets(s3_bucket, "h/")) >= 1, "the first hinted GET (held)")
        wait(lambda: (stream_state(m, "held") or {}).get("files_queued") == 20, "the window")
        held = len(gets(s3_bucket, "h/"))  # the background pool: 1 slot with --workers 3
        for t in readers:
            t.start()
        # all three demand GETs are at the server at once: no demand slot went to a hint
        wait(lambda: len(gets(s3_bucket, "d/")) == 3, "3 demand GETs at once")
        demand_gate.set()
        for t in readers:
            t.join(60)
        assert got == {k: data[k] for k in demand}  # done while every hint is still held
        assert len(gets(s3_bucket, "h/")) == held  # and no other hint started meanwhile
        assert (stream_state(m, "held") or {}).get("files_done") == 0
    finally:
        hint_gate.set()
        demand_gate.set()
        proxy.slow(None, 0)
    wait(lambda: (stream_state(m, "held") or {}).get("files_done") == 20, "the hints")
    assert sorted(get_keys(s3_bucket, "h/")) == hinted  # each fetched once, after the reads
    hints.close()


def test_hint_lookups_leave_metadata_slots_to_programs(s3_bucket: Bucket, mount) -> None:
    """Every metadata request about the hinted folders (one file in each of 20: a lookup
    each) is held at the server; the hints' lookups hold at most half the mount's metadata
    slots (``--workers 4``: 4 slots, 1 lookup of the hints at once), so a program's lookup
    and read elsewhere still complete."""
    from urllib.parse import unquote

    proxy = s3_bucket.proxy
    assert proxy is not None
    hinted = [f"m{i:02d}/f.bin" for i in range(20)]
    data = seed(s3_bucket, [*hinted, "other/x.bin"], 4 * KiB)
    # a long stall timeout: a held request is not abandoned and sent again meanwhile
    m = mount(s3_bucket, "--block-size", str(BLOCK), "--workers", "4", "--stall-timeout", "300")
    gate = threading.Event()
    name = s3_bucket.extra["name"]

    def about_m(method: str, pq: str) -> bool:
        path, _, query = pq.partition("?")
        return path.startswith(f"/{name}/m") or "prefix=m" in unquote(query)

    def hold(method: str, pq: str) -> bool:
        if method in ("GET", "HEAD") and about_m(method, pq):
            gate.wait(60)
        return False

    def held() -> int:
        return sum(1 for r in proxy.requests() if about_m(r.method, r.target))

    proxy.slow(hold, 0.001)
    try:
        hints = MountHints(m.path, window_files=64, stream="meta", list_folders=False)
        hints.start(hinted)
        wait(lambda: held() >= 1, "a lookup of the hints held at the server")
        assert (m.path / "other/x.bin").read_bytes() == data["other/x.bin"]  # not behind them
        assert held() <= 2  # one lookup of the hints at once: at most a HEAD and a LIST
    finally:
        gate.set()
        proxy.slow(None, 0)
    wait(lambda: done_or_cached(m, "meta") == 20, "the hints")
    hints.close()


def open_files() -> set[str]:
    """Paths this process holds open."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
    return out


def test_hint_stream_window_without_a_mount(tmp_path: Path) -> None:
    """The window's bookkeeping on the real core (local store, disk cache), no FUSE: files
    enter in order within the file and byte bounds, a reader that overtakes the hints skips
    the files it passed, missing paths and folders are counted, cancel drops the queue."""
    import trio
    from test_control import BLOCK as CBLOCK
    from test_control import _core

    objects = tmp_path / "objects"
    (objects / "d/sub").mkdir(parents=True)
    for i in range(12):
        (objects / f"d/{i:02d}").write_bytes(blob(CBLOCK, i))
    m = _core(tmp_path, workers="3")
    hints = m.control.hints

    async def until(cond: Any) -> None:
        with trio.fail_after(30):
            while not cond():
                await trio.sleep(0.01)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            m.reader.start(nursery)
            opened = await m.control.execute(["hint-open", "s", "4", str(3 * CBLOCK)])
            assert (opened["window_files"], opened["window_bytes"]) == (4, 3 * CBLOCK)
            names = ["d/00", "d/sub", "d/nope", *[f"d/{i:02d}" for i in range(1, 12)]]
            await m.control.execute(["hint", "s", *names])
            st = hints._streams["s"]
            await until(lambda: st.hinted == 3 and st.req.files_done == 3)
            # the byte bound (3 blocks) holds the window at 3 files, though 4 are allowed
            assert [e[0] for e in st.window] == [0, 3, 4] and st.missing == 2
            state = await m.control.execute(["hint-at", "s", "9"])  # the reader ran ahead
            assert state["files_skipped"] >= 3
            await until(lambda: st.hinted == 6 and st.req.files_done == 6)
            assert [e[0] for e in st.window] == [9, 10, 11]
            gone = await m.control.execute(["hint-cancel", "s"])
            assert gone["files_cancelled"] == 0 and "s" not in hints._streams
            nursery.cancel_scope.cancel()

    trio.run(main)
    m.blocks.close()


def test_a_stream_in_a_big_folder_lists_it_instead_of_asking_per_file(
    s3_bucket: Bucket, mount, tmp_path: Path
) -> None:
    """Hinting 300 files of a folder of 1,100 objects (more than one listing page) lists the
    folder once instead of a HEAD and a LIST per name; the program's opens then ask nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from fusefs.testing.proxy import is_head, is_list

    proxy = s3_bucket.proxy
    assert proxy is not None
    names = [f"coco/{i:06d}.jpg" for i in range(1100)]
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda k: s3_bucket.put(k, k.encode()), names))
    m = mount(s3_bucket, "--block-size", str(BLOCK))
    order = random.Random(3).sample(names, 300)
    prefix = f"/{s3_bucket.extra['name']}"

    def mine(pred: Any) -> int:
        return sum(1 for r in proxy.requests() if pred(r) and r.path.startswith(prefix))

    heads, lists = mine(is_head), mine(is_list)
    with MountHints(m.path, window_files=400, stream="coco") as hints:
        hints.start(order)
        wait(lambda: done_or_cached(m, "coco") == 300, "hints")
        assert mine(is_head) <= heads + 1  # no HEAD per name (one: the folder's marker)
        assert mine(is_list) - lists <= 6  # the folder's pages (and a root listing)
        before = len(proxy.requests())
        for k in order:
            assert (m.path / k).read_bytes() == k.encode()
        assert len(proxy.requests()) == before  # opens and reads: nothing reached the server

    # while files of the window wait in that folder, its listing is renewed as it expires
    m2 = mount(s3_bucket, "--block-size", str(BLOCK), "--metadata-ttl", "1",
               cache_dir=tmp_path / "cache2")  # fmt: skip
    with MountHints(m2.path, window_files=400, stream="coco") as hints:
        hints.start(order)
        wait(lambda: done_or_cached(m2, "coco") == 300, "hints")
        listed = mine(is_list)
        wait(lambda: mine(is_list) >= listed + 4, "the folder listed again, twice")


def test_hinted_files_on_s3_are_opened_without_a_request_for_their_metadata(
    s3_bucket: Bucket, mount, tmp_path: Path
) -> None:
    """S3 listings lack metadata; a file whose metadata is unknown has its attributes cached
    by the kernel for no time, so the program's ``open`` asks for them (GETATTR). A hinted
    file's prefetch (an object of at most 1 MiB) fetches it whole with a GET that brings its
    metadata too: the program's opens, stats and reads then reach the server not once, and
    each file cost one GET in all."""
    from fusefs.testing.proxy import is_file_head, is_object_get

    proxy = s3_bucket.proxy
    assert proxy is not None
    names = [f"imgs/{i:04d}.jpg" for i in range(60)]
    client, bname = s3_bucket.extra["client"], s3_bucket.extra["name"]
    for i, k in enumerate(names):  # above the link probe size, below a block
        client.put_object(Bucket=bname, Key=k, Body=blob(20 * KiB, i),
                          Metadata={"mode": "0100640"})
    m = mount(s3_bucket, "--block-size", str(BLOCK))
    order = random.Random(5).sample(names, 40)
    proxy.reset()
    with MountHints(m.path, window_files=100, stream="imgs") as hints:
        hints.start(order)
        wait(lambda: (stream_state(m, "imgs") or {}).get("files_done") == 40, "hints")
        before = len(proxy.requests())
        for k in order:
            assert (m.path / k).read_bytes() == blob(20 * KiB, names.index(k))
            assert os.stat(m.path / k).st_mode & 0o777 == 0o640
        assert len(proxy.requests()) == before  # opens, reads, stats: nothing reached it
    assert proxy.count(predicate=is_file_head) == 0
    assert proxy.count(predicate=is_object_get) == 40
