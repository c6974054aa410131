"""Running fusefs as a system service, for real: the systemd unit (systemd-analyze verify), the
notify protocol against a datagram socket bound here, SIGHUP, logs, ``mount -t fuse.fusefs`` and
``mount -a`` through the installed ``mount.fuse.fusefs`` helper."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Bucket
from svc_support import (
    STRANGER,
    WorldDir,
    fuse_mount_at,
    fusefs_cmd,
    mounts_under,
    pids_mentioning,
    run_as,
    wait_answering,
    wait_gone,
)

from fusefs.cli_control import send_command

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "fusefs@.service"
EXAMPLE = REPO / "systemd" / "example.toml"
STOP_BOUND = 15.0
#: mount(8) looks for helpers in /sbin only (util-linux 2.38: /sbin, /sbin/fs.d, /sbin/fs)
HELPER = Path("/sbin/mount.fuse.fusefs")
HELPER_MARK = "# installed by the fusefs test suite"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FUSEFS_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM"))}
    env["FUSEFS_CONFIG_PATH"] = os.devnull
    env.update(extra)
    return env


def _config(path: Path, **values: object) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def _wait_text(path: Path, text: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path} after {timeout}s:\n{content[-2000:]}")


# --- the systemd unit ----------------------------------------------------------------------


def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    exe = shutil.which("fusefs")
    assert exe is not None
    text = UNIT.read_text()
    assert "Type=notify" in text and "Restart=on-failure" in text
    assert "ExecStop=" in text and "DeviceAllow=/dev/fuse rw" in text
    # verify checks that ExecStart= exists: point it at this machine's fusefs
    unit = tmp_path / "fusefs@.service"
    unit.write_text(text.replace("/usr/local/bin/fusefs", os.path.realpath(exe)))
    (tmp_path / "fusefs@datasets.service").symlink_to(unit.name)
    for name in ("fusefs@.service", "fusefs@datasets.service"):
        r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip() == "", r.stderr  # unknown keys and bad values are warnings


def test_example_config_loads() -> None:
    from fusefs.cli import config_mount_keys
    from fusefs.config import load_settings

    s = load_settings({}, env={}, config_path=str(EXAMPLE))
    assert s.allow_other and s.read_only and s.cache_size == 20 * 1024**3
    keys = config_mount_keys(str(EXAMPLE))
    assert keys["source"] == "s3://my-bucket/datasets"
    assert keys["mountpoint"] == "/mnt/datasets" and keys["options"] == ["noexec"]


# --- the notify protocol -------------------------------------------------------------------


class NotifySocket:
    """A datagram socket bound where ``$NOTIFY_SOCKET`` points, as systemd does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, field: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> str:
        """Receive until a datagram holds ``field`` (e.g. ``READY=1``); returns that datagram."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(0.1)
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                if proc.poll() is not None and field != "STOPPING=1":
                    raise AssertionError(
                        f"fusefs exited {proc.returncode} before {field}") from None
                continue
            self.messages.append(msg)
            if field in msg.split("\n") or any(f.startswith(field) for f in msg.split("\n")):
                return msg
        raise AssertionError(f"no {field} within {timeout}s; got {self.messages}")

    def pending(self) -> list[str]:
        self.sock.setblocking(False)
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    try:
        yield s
    finally:
        s.close()


def test_notify_ready_status_watchdog_stopping(world: WorldDir, notify_socket: NotifySocket,
                                               tmp_path: Path) -> None:
    src = world.mkdir("src", 0o700)
    (src / "a.txt").write_bytes(b"a" * 1000)
    mp = world.mkdir("mnt")
    cfg = _config(tmp_path / "svc.toml", source=f"file://{src}", mountpoint=str(mp),
                  cache_dir=str(world.path / "cache"), cache_size="64M",
                  log_file=str(tmp_path / "svc.log"))
    env = _env(NOTIFY_SOCKET=str(notify_socket.path), FUSEFS_STATUS_INTERVAL="0.3",
               WATCHDOG_USEC="400000")
    # what the unit's ExecStart= runs: source and mount point come from the config file
    proc = world.popen(fusefs_cmd("mount", "--foreground", "--config", str(cfg)), env=env)
    ready = notify_socket.wait_for("READY=1", proc)
    # READY=1 only once the mount answers
    assert fuse_mount_at(mp) is not None
    assert os.listdir(mp) == ["a.txt"]
    fields = dict(f.split("=", 1) for f in ready.split("\n"))
    assert "MAINPID" not in fields  # the foreground process is the main process
    assert re.fullmatch(rf"file://{src} on {mp}: cache [0-9.]+[KM]?B of 64\.0MB \(0 blocks\), "
                        r"hit ratio -, 0B served, 0 fetches, 0 errors", fields["STATUS"])
    assert (mp / "a.txt").read_bytes() == b"a" * 1000
    status = notify_socket.wait_for("STATUS=", proc)
    while "1 fetches" not in status:  # the periodic STATUS= follows the activity
        status = notify_socket.wait_for("STATUS=", proc)
    assert "hit ratio 0%" in status and "1000B served" in status and "(1 blocks)" in status
    assert notify_socket.wait_for("WATCHDOG=1", proc)
    # what the unit's ExecStop= runs
    r = subprocess.run(fusefs_cmd("unmount", "--config", str(cfg)), env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert proc.wait(STOP_BOUND) == 0
    notify_socket.wait_for("STOPPING=1", proc)
    assert fuse_mount_at(mp) is None
    assert sum("READY=1" in m for m in notify_socket.messages + notify_socket.pending()) == 1


def test_sigterm_sends_stopping(world: WorldDir, notify_socket: NotifySocket) -> None:
    src = world.mkdir("src", 0o700)
    mp = world.mkdir("mnt")
    env = _env(NOTIFY_SOCKET=str(notify_socket.path))
    proc = world.popen(fusefs_cmd("mount", f"file://{src}", str(mp), "--foreground",
                                  "--cache-dir", str(world.path / "cache")), env=env)
    notify_socket.wait_for("READY=1", proc)
    proc.send_signal(signal.SIGTERM)
    stopping = notify_socket.wait_for("STOPPING=1", proc)
    assert f"STATUS=Stopping: unmounting {mp}" in stopping
    assert proc.wait(STOP_BOUND) == 0
    assert fuse_mount_at(mp) is None


def test_unit_stop_sequence_with_a_busy_mount(world: WorldDir, notify_socket: NotifySocket,
                                              tmp_path: Path) -> None:
    """systemctl stop: ExecStop's clean unmount fails while a file is open (ignored by the
    unit), then SIGTERM detaches the mount anyway and the daemon exits 0."""
    src = world.mkdir("src", 0o700)
    (src / "open.txt").write_bytes(b"held open\n")
    mp = world.mkdir("mnt")
    cfg = _config(tmp_path / "busy.toml", source=f"file://{src}", mountpoint=str(mp),
                  cache_dir=str(world.path / "cache"))
    env = _env(NOTIFY_SOCKET=str(notify_socket.path))
    proc = world.popen(fusefs_cmd("mount", "--foreground", "--config", str(cfg)), env=env)
    notify_socket.wait_for("READY=1", proc)
    fd = os.open(mp / "open.txt", os.O_RDONLY)
    try:
        r = subprocess.run(fusefs_cmd("unmount", "--config", str(cfg)), env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1
        assert r.stderr.strip().endswith("(files open? try --lazy)"), r.stderr
        assert proc.poll() is None and fuse_mount_at(mp) is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_BOUND) == 0
        assert fuse_mount_at(mp) is None
        with pytest.raises(OSError):
            os.pread(fd, 10, 0)  # the open file fails instead of hanging
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def test_no_ready_when_the_mount_fails(world: WorldDir, notify_socket: NotifySocket) -> None:
    mp = world.mkdir("mnt")
    env = _env(NOTIFY_SOCKET=str(notify_socket.path))
    r = subprocess.run(fusefs_cmd("mount", "file:///nonexistent-fusefs-dir", str(mp),
                                  "--foreground"), env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "fusefs: directory /nonexistent-fusefs-dir does not exist"]
    assert not any("READY=1" in m for m in notify_socket.pending())
    r = subprocess.run(fusefs_cmd("mount", "--foreground"), env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("fusefs: give SOURCE and MOUNTPOINT")


def test_notify_abstract_socket() -> None:
    from fusefs import notify

    name = f"fusefs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        old = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = "@" + name
        try:
            assert notify.send("STATUS=multi\nline", "READY=1")
        finally:
            if old is None:
                del os.environ["NOTIFY_SOCKET"]
            else:
                os.environ["NOTIFY_SOCKET"] = old
        assert s.recv(4096) == b"STATUS=multi line\nREADY=1"


# --- SIGHUP and logs -----------------------------------------------------------------------


def test_sighup_reopens_log_and_reloads_runtime_settings(world: WorldDir, tmp_path: Path) -> None:
    src = world.mkdir("src", 0o700)
    (src / "a.txt").write_bytes(b"a")
    mp = world.mkdir("mnt")
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    base = {"source": f"file://{src}", "mountpoint": str(mp),
            "cache_dir": str(world.path / "cache")}
    cfg = _config(tmp_path / "hup.toml", **base, log_file=str(log_a), metadata_ttl=60,
                  negative_ttl=60)
    proc = world.popen(fusefs_cmd("mount", "--foreground", "--config", str(cfg)), env=_env())
    wait_answering(mp, proc)
    assert os.listdir(mp) == ["a.txt"]
    (src / "b.txt").write_bytes(b"b")
    assert os.listdir(mp) == ["a.txt"]  # the listing is trusted for 60 s
    _config(cfg, **base, log_file=str(log_b), log_level="debug", metadata_ttl=0.2,
            negative_ttl=0.2, cache_size="1G")
    proc.send_signal(signal.SIGHUP)
    text = _wait_text(log_b, "SIGHUP: log reopened")
    applied = text.split("SIGHUP: log reopened; applied ", 1)[1].split("\n", 1)[0].split()
    assert sorted(applied) == ["log_file=" + str(log_b), "log_level=DEBUG",
                               "metadata_ttl=0.2", "negative_ttl=0.2"]
    assert "takes effect at the next mount: cache_size\n" in text
    assert "SIGHUP" not in log_a.read_text()
    time.sleep(0.3)
    assert sorted(os.listdir(mp)) == ["a.txt", "b.txt"]  # the new TTL is in force
    # a broken config file changes nothing, and the mount keeps serving
    cfg.write_text("metadata_ttl = [\n")
    proc.send_signal(signal.SIGHUP)
    _wait_text(log_b, "SIGHUP: config not reloaded, keeping the running settings")
    assert (mp / "b.txt").read_bytes() == b"b"
    # logrotate: the file is moved away, SIGHUP starts a new one
    log_b.rename(tmp_path / "b.log.1")
    proc.send_signal(signal.SIGHUP)
    _wait_text(log_b, "SIGHUP: log reopened")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_BOUND) == 0
    for line in log_b.read_text().splitlines():
        assert LOG_LINE.match(line), line  # one line per event, with time and level


def test_journal_gets_priority_prefixes(world: WorldDir, tmp_path: Path) -> None:
    src = world.mkdir("src", 0o700)
    mp = world.mkdir("mnt")
    out = tmp_path / "stderr"
    with open(out, "wb") as f:
        st = os.fstat(f.fileno())
        env = _env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = world.popen(fusefs_cmd("mount", f"file://{src}", str(mp), "--foreground",
                                      "--cache-dir", str(world.path / "cache")),
                           env=env, stderr=f)
        wait_answering(mp, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_BOUND) == 0
    lines = out.read_text().splitlines()
    assert f"<6>INFO fusefs.mount: mounted file://{src} on {mp}" in lines
    assert all(re.match(r"<[2-7]>[A-Z]+ ", line) for line in lines), lines


def test_credentials_never_logged(s3_bucket: Bucket, mount) -> None:
    secret = "fusefs-secret-" + os.urandom(8).hex()
    s3_bucket.env["AWS_SECRET_ACCESS_KEY"] = secret  # moto does not check signatures
    s3_bucket.put("c.txt", b"c")
    m = mount(s3_bucket)  # --log-level debug
    assert (m.path / "c.txt").read_bytes() == b"c"
    assert m.stop() == 0
    log = m.log_text()
    assert "mounted s3://" in log and secret not in log


def test_bad_log_file_is_one_line(world: WorldDir) -> None:
    src = world.mkdir("src", 0o700)
    mp = world.mkdir("mnt")
    r = subprocess.run(fusefs_cmd("mount", f"file://{src}", str(mp), "--log-file",
                                  "/nonexistent-fusefs-dir/x.log"),
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "fusefs: cannot open log file /nonexistent-fusefs-dir/x.log: No such file or directory"]


# --- mount -t fuse.fusefs, fstab ------------------------------------------------------------


@pytest.fixture(scope="module")
def helper() -> Iterator[Path]:
    """``/sbin/mount.fuse.fusefs`` running this checkout; a real installation is used as is."""
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is not installed")
    if HELPER.exists() and HELPER_MARK not in HELPER.read_text(errors="replace"):
        yield HELPER  # installed by an administrator: test that one
        return
    HELPER.write_text(
        f'#!/bin/sh\n{HELPER_MARK}\nexec {sys.executable} -m fusefs.mount_helper "$@"\n')
    HELPER.chmod(0o755)
    try:
        yield HELPER
    finally:
        HELPER.unlink(missing_ok=True)


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], env=_env(), capture_output=True, text=True,
                          timeout=60)


def test_mount_t_fuse_fusefs(helper: Path, world: WorldDir) -> None:
    src = world.mkdir("src", 0o700)
    (src / "data.txt").write_bytes(b"for everyone\n")
    mp = world.mkdir("mnt")
    opts = (f"ro,allow_other,cache_size=64M,cache_dir={world.path / 'cache'},"
            f"log_file={world.path / 'helper.log'}")
    r = _mount("-t", "fuse.fusefs", f"file://{src}", str(mp), "-o", opts)
    assert r.returncode == 0, r.stderr
    # mount(8) returned: the mount answers already, for other users too
    fstype, mopts = fuse_mount_at(mp) or ("", "")
    assert fstype == "fuse.fusefs"
    # -o ro is fusefs's read-only mode, and the kernel side is ro too (issue 19)
    assert {"allow_other", "default_permissions", "ro"} <= set(mopts.split(","))
    assert os.stat(mp / "data.txt").st_mode & 0o777 == 0o444
    r = subprocess.run(["sh", "-c", f"echo x >> {mp / 'data.txt'}"], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    send_command(str(mp), ["clear"])  # through the control socket: the mount is ro
    r = run_as(STRANGER, STRANGER, "cat", str(mp / "data.txt"))
    assert r.returncode == 0 and r.stdout == "for everyone\n"
    daemons = pids_mentioning(str(mp))
    assert daemons, "no daemon left running after mount(8) returned"
    r = subprocess.run(["umount", str(mp)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert wait_gone(daemons, STOP_BOUND)  # the daemon exits once unmounted
    assert fuse_mount_at(mp) is None
    assert "was unmounted" in (world.path / "helper.log").read_text()


def test_mount_t_failures_are_one_line(helper: Path, world: WorldDir) -> None:
    mp = world.mkdir("mnt")
    r = _mount("-t", "fuse.fusefs", "file:///nonexistent-fusefs-dir", str(mp))
    assert r.returncode == 32  # mount(8): mount failure
    assert r.stderr.strip().splitlines() == [
        "fusefs: directory /nonexistent-fusefs-dir does not exist"]
    src = world.mkdir("src", 0o700)
    r = _mount("-t", "fuse.fusefs", f"file://{src}", str(mp), "-o", "cache_size=lots")
    assert r.returncode == 32
    assert len(r.stderr.strip().splitlines()) == 1 and "cache-size" in r.stderr
    assert "Traceback" not in r.stderr
    assert fuse_mount_at(mp) is None
    # -f (fake) mounts nothing; bad invocations are exit 1 with a usage line
    helper_cmd = [sys.executable, "-m", "fusefs.mount_helper"]
    assert subprocess.run([*helper_cmd, f"file://{src}", str(mp), "-f"],
                          timeout=60).returncode == 0
    assert fuse_mount_at(mp) is None
    r = subprocess.run([*helper_cmd, f"file://{src}"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("mount.fuse.fusefs: need SOURCE")


def test_fstab_mount_a(helper: Path, world: WorldDir) -> None:
    src = world.mkdir("src", 0o700)
    (src / "f.txt").write_bytes(b"from fstab\n")
    auto, manual = world.mkdir("auto"), world.mkdir("manual")
    common = f"allow_other,cache_size=64M,cache_dir={world.path / 'cache'}"
    fstab = world.path / "fstab"
    fstab.write_text(
        "# a temporary fstab\n"
        f"file://{src} {auto} fuse.fusefs ro,_netdev,nofail,x-systemd.automount,"
        f"x-systemd.idle-timeout=60,{common},log_file={world.path / 'auto.log'} 0 0\n"
        f"file://{src} {manual} fuse.fusefs noauto,{common} 0 0\n"
    )
    r = _mount("-a", "-T", str(fstab))
    assert r.returncode == 0, r.stderr
    assert fuse_mount_at(auto) is not None
    assert fuse_mount_at(manual) is None  # noauto
    r = run_as(STRANGER, STRANGER, "cat", str(auto / "f.txt"))
    assert r.returncode == 0 and r.stdout == "from fstab\n"
    assert _mount("-a", "-T", str(fstab)).returncode == 0  # again: already mounted, no error
    assert [t for mp, t, _ in mounts_under(auto) if t.startswith("fuse")] == ["fuse.fusefs"]
    r = _mount("-T", str(fstab), str(manual))  # by mount point, as `mount /mnt/x` does
    assert r.returncode == 0, r.stderr
    assert (manual / "f.txt").read_bytes() == b"from fstab\n"
    for mp in (auto, manual):
        daemons = pids_mentioning(str(mp))
        assert subprocess.run(["umount", str(mp)], timeout=30).returncode == 0
        assert wait_gone(daemons, STOP_BOUND)


def _has_autofs() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1:] == ["autofs"] for line in f)
    except OSError:
        return False


@pytest.mark.skipif(not _has_autofs(), reason="the kernel has no autofs filesystem "
                    "(/proc/filesystems; load it with modprobe autofs4)")
def test_mounts_over_an_automount_point(world: WorldDir) -> None:
    """``x-systemd.automount``: systemd puts an autofs trigger on the mount point and, on first
    access, runs the mount on top of it. Here this process plays systemd (its process group
    is the autofs daemon's, so its own accesses do not trigger); a trigger left unanswered
    would hang the mount, so a mount that finishes proves fusefs never walked into it."""
    src = world.mkdir("src", 0o700)
    (src / "f.txt").write_bytes(b"automounted\n")
    mp = world.mkdir("auto")
    r, w = os.pipe()
    try:
        subprocess.run(["mount", "-t", "autofs", "-o",
                        f"fd={w},pgrp={os.getpgrp()},minproto=5,maxproto=5,direct",
                        "fusefs-test-automount", str(mp)], pass_fds=[w], check=True, timeout=30)
        assert [t for _, t, _ in mounts_under(mp)] == ["autofs"]
        res = subprocess.run(fusefs_cmd("mount", f"file://{src}", str(mp), "--cache-dir",
                                        str(world.path / "cache")),
                             env=_env(), capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "is an automount point; mounting over it" in res.stderr
        assert [t for _, t, _ in mounts_under(mp)] == ["autofs", "fuse.fusefs"]
        # another user is refused by the FUSE mount (no allow_other): fusefs is on top
        other = run_as(STRANGER, STRANGER, "ls", str(mp))
        assert other.returncode != 0 and "Permission denied" in other.stderr
        assert (mp / "f.txt").read_bytes() == b"automounted\n"
    finally:
        os.close(r)
        os.close(w)


def test_split_options_translates_fstab_options(tmp_path: Path) -> None:
    from fusefs.cli import config_mount_keys, split_options
    from fusefs.errors import UserError

    settings, fuse = split_options(["ro,allow_other,cache_size=20G,uid=root,gid=0,_netdev",
                                    "nofail,defaults,noauto,relatime,noexec,nosuid,x-foo=1"])
    assert settings == {"read_only": "true", "allow_other": "true", "cache_size": "20G",
                        "uid": "0", "gid": "0"}
    assert fuse == ["noexec", "nosuid"]
    with pytest.raises(UserError, match="no such user"):
        split_options(["uid=no-such-user-fusefs"])
    cfg = _config(tmp_path / "c.toml", source="file:///x", options="noexec,cache_size=1G")
    with pytest.raises(UserError, match="write cache_size as a key of its own"):
        config_mount_keys(str(cfg))
