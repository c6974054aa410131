"""The write path's local parts: ranges, staged files, the journal, the staging directory."""

from __future__ import annotations

import os

import pytest

from fusefs.backends.base import ObjectInfo
from fusefs.errors import NoSpace
from fusefs.write import ranges
from fusefs.write.staged import StagedFile
from fusefs.write.staging import Staging


def test_ranges_add_merges_touching_and_overlapping():
    rs: ranges.Ranges = []
    rs = ranges.add(rs, 10, 20)
    rs = ranges.add(rs, 30, 40)
    assert rs == [(10, 20), (30, 40)]
    rs = ranges.add(rs, 20, 30)
    assert rs == [(10, 40)]
    rs = ranges.add(rs, 0, 5)
    rs = ranges.add(rs, 50, 60)
    rs = ranges.add(rs, 3, 55)
    assert rs == [(0, 60)]
    assert ranges.add(rs, 5, 5) == rs


def test_ranges_gaps_and_clip():
    rs = [(10, 20), (30, 40)]
    assert ranges.gaps(rs, 0, 50) == [(0, 10), (20, 30), (40, 50)]
    assert ranges.gaps(rs, 12, 18) == []
    assert ranges.gaps(rs, 15, 35) == [(20, 30)]
    assert ranges.clip(rs, 35) == [(10, 20), (30, 35)]
    assert ranges.clip(rs, 10) == []
    assert ranges.covered(rs, 31, 39)


def _model_bytes(sf: StagedFile, base: bytes) -> bytes:
    """The file as a reader of the staged file would see it (base bytes from ``base``)."""
    out = b""
    for local, a, b in sf.segments(0, sf.size):
        if local:
            data = sf.read_local(a, b - a)
            out += data + bytes(b - a - len(data))
        else:
            out += base[a:b]
    return out


def test_staged_file_is_a_model_of_writes_and_truncates(tmp_path):
    """Random writes, truncates down and up over a base object: the staged view equals a
    plain bytearray, and only changed ranges of the base are marked as local."""
    import random

    rnd = random.Random(7)
    base = bytes(rnd.randrange(256) for _ in range(50_000))
    st = Staging(str(tmp_path), "s3://b")
    sf = st.create("f", ObjectInfo("f", len(base), 1.0, "v1"), "v1")
    model = bytearray(base)
    for _ in range(300):
        op = rnd.random()
        if op < 0.7:
            off = rnd.randrange(0, len(model) + 5000)
            data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 3000)))
            sf.write(off, data)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + len(data)] = data
        else:
            n = rnd.randrange(0, len(model) + 8000)
            sf.truncate(n)
            if n < len(model):
                del model[n:]
            else:
                model.extend(bytes(n - len(model)))
        assert sf.size == len(model)
        assert _model_bytes(sf, base) == bytes(model)
    # the copy ranges are exactly the untouched parts of the base, at their offsets
    for a, b in sf.copy_ranges():
        assert model[a:b] == base[a:b]
    st.close()


def test_untouched_base_is_never_local(tmp_path):
    st = Staging(str(tmp_path), "s3://b")
    sf = st.create("f", ObjectInfo("f", 10 * 2**20, 1.0, "v1"), "v1")
    sf.write(5 * 2**20, b"x" * 100)
    assert sf.copy_ranges() == ((0, 5 * 2**20), (5 * 2**20 + 100, 10 * 2**20))
    assert os.fstat(sf.fd).st_blocks * 512 < 2**20  # sparse: the base is not copied
    st.close()


def test_journal_survives_and_unclosed_files_are_kept_not_uploaded(tmp_path):
    st = Staging(str(tmp_path), "s3://b")
    a = st.create("a", None, "")
    a.write(0, b"hello")
    rec, _ = st.snapshot(a)
    st.sync(a, rec)
    b = st.create("b", None, "")
    b.write(0, b"never closed")
    rec_b, _ = st.snapshot(b, state="open")
    st.sync(b, rec_b)
    st.close()  # as if killed: nothing else recorded

    st2 = Staging(str(tmp_path), "s3://b")
    got = {sf.key: sf for sf in st2.recover()}
    assert set(got) == {"a", "b"}
    assert got["a"].rec.state == "pending" and got["a"].needs_upload
    assert got["a"].read_local(0, 5) == b"hello"
    assert got["b"].rec.state == "failed" and "never closed" in got["b"].rec.error
    st2.close()


def test_a_second_mount_of_one_source_gets_its_own_directory_and_adopts_when_free(tmp_path):
    first = Staging(str(tmp_path), "s3://b")
    second = Staging(str(tmp_path), "s3://b")
    assert first.dir != second.dir
    sf = second.create("x", None, "")
    sf.write(0, b"data")
    rec, _ = second.snapshot(sf)
    second.sync(sf, rec)
    second.close()
    first.close()
    third = Staging(str(tmp_path), "s3://b")
    assert [s.key for s in third.recover()] == ["x"]
    assert not os.path.exists(second.dir)
    third.close()


def test_other_sources_are_not_adopted(tmp_path):
    a = Staging(str(tmp_path), "s3://one")
    sf = a.create("x", None, "")
    rec, _ = a.snapshot(sf)
    a.sync(sf, rec)
    a.close()
    b = Staging(str(tmp_path), "s3://two")
    assert b.recover() == []
    b.close()


def test_a_full_disk_is_enospc(tmp_path):
    st = Staging(str(tmp_path), "s3://b")
    sf = st.create("f", None, "")
    os.close(sf.fd)
    sf.fd = os.open("/dev/full", os.O_WRONLY)
    with pytest.raises(NoSpace):
        sf.write(0, b"x" * 4096)
    st.close()


def test_the_staged_index_answers_folder_questions(tmp_path):
    st = Staging(str(tmp_path), "s3://b")
    for key in ("top", "a/x", "a/b/y", "a/b/z", "c/d/e/f"):
        st.create(key, None, "")
    idx = st.files
    assert idx.has_under("") and idx.has_under("a") and idx.has_under("a/b")
    assert idx.has_under("c/d/e") and not idx.has_under("b") and not idx.has_under("a/b/y")
    files, subs = idx.in_folder("a")
    assert [f.key for f in files] == ["a/x"] and subs == {"b"}
    files, subs = idx.in_folder("")
    assert [f.key for f in files] == ["top"] and subs == {"a", "c"}
    st.rekey(idx["a/b/y"], "q/y")
    st.remove(idx["a/b/z"])
    assert not idx.has_under("a/b") and idx.has_under("q")
    assert idx.in_folder("a") == ([idx["a/x"]], set())
    st.close()
