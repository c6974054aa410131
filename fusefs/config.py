"""Settings, declared once: type, default, environment variable, help.

Values are layered, highest first: command-line flag, environment variable, config file
(``$FUSEFS_CONFIG_PATH`` or ``~/.config/fusefs/config.toml``), default. Each value is validated
once, and a bad one is rejected with one line naming the setting and where it came from.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import UserError
from .safety import redact_url

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4
#: Background listings one level ahead of a tree walker that run at once.
LIST_AHEAD_PARALLEL = 8
_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def prefetch_concurrency(workers: int) -> int:
    """Background fetches (prefetch, hints) at once beside ``workers`` demand fetches: all but
    a reserve (2, or an eighth of the workers if more), and at least one."""
    return max(1, workers - max(2, workers // 8))


def parse_size(text: str | int) -> int:
    """``32G`` -> bytes. Accepts K/M/G/T with optional ``i``/``B`` (binary units), and -1."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use bytes or a suffix, e.g. 512M, 32G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_size(n: float) -> str:
    """Bytes -> ``32.0GB`` (binary multiples, the units users see in ``df -h``)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return f"{n:.1f}TB"


def _parse_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _positive_int(v: Any) -> int:
    n = int(v)
    if n <= 0:
        raise ValueError(f"must be a positive integer, got {v!r}")
    return n


def _non_negative_int(v: Any) -> int:
    n = int(v)
    if n < 0:
        raise ValueError(f"must be >= 0, got {v!r}")
    return n


def _block_size(v: Any) -> int:
    n = parse_size(v)
    if n < 64 * KiB or n > 256 * MiB:
        raise ValueError(f"must be between 64K and 256M, got {v!r}")
    return n


def _size(v: Any) -> int:
    n = parse_size(v)
    if n < 0:
        raise ValueError(f"must be a size >= 0, got {v!r}")
    return n


def _cache_size(v: Any) -> int:
    n = parse_size(v)
    if n < -1:
        raise ValueError(f"must be a size, or 0 / -1 to disable the cache, got {v!r}")
    return n


_FOREVER = ("forever", "indefinite", "inf", "infinite", "never")


def _ttl(v: Any) -> float:
    """Seconds, or ``forever`` (also ``indefinite``, as mountpoint-s3 spells it)."""
    if isinstance(v, str) and v.strip().lower() in _FOREVER:
        return math.inf
    return _seconds(v)


def _seconds(v: Any) -> float:
    n = float(v)
    if n != n or n < 0:
        raise ValueError(f"must be >= 0 seconds, got {v!r}")
    return n


def _positive_seconds(v: Any) -> float:
    n = float(v)
    if not n > 0:
        raise ValueError(f"must be > 0 seconds, got {v!r}")
    return n


#: ``--metadata-probe`` modes (see :mod:`fusefs.folders`, ``docs/posix.md``)
METADATA_PROBES = ("auto", "head", "off")


def _metadata_probe(v: Any) -> str:
    s = str(v).strip().lower()
    if s not in METADATA_PROBES:
        raise ValueError(f"must be one of {', '.join(METADATA_PROBES)}, got {v!r}")
    return s


def _log_level(v: Any) -> str:
    s = str(v).upper()
    if s not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"must be one of debug, info, warning, error, got {v!r}")
    return s


def _octal_mode(v: Any) -> int:
    """Permission bits written in octal, as ``chmod`` takes them: ``"0644"``, ``"644"``,
    ``"0o644"``. A bare TOML integer is refused: ``644`` would be read as decimal (0o1204),
    and ``0o644`` cannot be told apart from a decimal 420 once parsed."""
    if isinstance(v, int):
        raise ValueError('write the mode as an octal string in quotes, e.g. "0644"')
    try:
        n = int(str(v).strip(), 8)
    except ValueError:
        raise ValueError(f"not an octal file mode: {v!r} (e.g. 0644)") from None
    if not 0 <= n <= 0o7777:
        raise ValueError(f"not a file mode: {v!r}")
    return n


def _opt_str(v: Any) -> str | None:
    return str(v) if v not in (None, "") else None


def _opt_int(v: Any) -> int | None:
    return int(v) if v not in (None, "") else None


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT``; a bare ``PORT`` means loopback) -> (host, port)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT, e.g. 127.0.0.1:9100: {text!r}")
    return host, int(port)


def _host_port(v: Any) -> str | None:
    if v in (None, ""):
        return None
    parse_host_port(str(v))
    return str(v).strip()


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fusefs")


def default_config_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    home = env.get("HOME") or os.path.expanduser("~")
    base = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return os.path.join(base, "fusefs", "config.toml")


def _meta(parse: Callable[[Any], Any], env: str | None, help: str) -> dict[str, Any]:
    return {"parse": parse, "env": env, "help": help}


def default_fetch_workers() -> int:
    """One fetch worker per core this process may run on, beyond the first."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(0, cores - 1)


@dataclass
class Settings:
    """Every tunable of a mount. Field metadata: parser, environment variable, help text."""

    cache_dir: str = field(
        default_factory=default_cache_dir,
        metadata=_meta(os.path.expanduser, "FUSEFS_CACHE_DIR", "block cache directory"),
    )
    cache_size: int = field(
        default=32 * GiB,
        metadata=_meta(
            _cache_size,
            "FUSEFS_CACHE_SIZE_BYTES",
            "cache size bound (32G, 512M...); 0 or -1 disables",
        ),
    )
    block_size: int = field(
        default=8 * MiB, metadata=_meta(_block_size, "FUSEFS_BLOCK_SIZE_BYTES", "cache block size")
    )
    workers: int = field(
        default=16,
        metadata=_meta(_positive_int, "FUSEFS_NUM_WORKERS",
                       "programs' block fetches in parallel (prefetch and hints run beside "
                       "them, only while no read waits)"),
    )
    fetch_workers: int = field(
        default_factory=lambda: default_fetch_workers(),
        metadata=_meta(
            _non_negative_int,
            "FUSEFS_FETCH_WORKERS",
            "worker processes that fetch, check and cache blocks, send uploads and list "
            "folders (default: one per core beyond the first); 0 does all of it in the FUSE "
            "process",
        ),
    )
    stall_timeout: float = field(
        default=2.0,
        metadata=_meta(
            _positive_seconds,
            "FUSEFS_STALL_TIMEOUT",
            "seconds a store response may make no progress before it is abandoned and retried",
        ),
    )
    metadata_ttl: float = field(
        default=60.0,
        metadata=_meta(
            _ttl,
            "FUSEFS_METADATA_TTL",
            "seconds metadata and listings are trusted, or 'forever' (data that never changes)",
        ),
    )
    negative_ttl: float = field(
        default=5.0,
        metadata=_meta(_seconds, "FUSEFS_NEGATIVE_TTL", "seconds a missing name is remembered"),
    )
    readahead_max: int = field(
        default=64 * MiB,
        metadata=_meta(
            _size,
            "FUSEFS_READAHEAD_MAX_BYTES",
            "largest readahead window of a sequential reader",
        ),
    )
    read_ahead_kb: int = field(default=1024, metadata=_meta(
        _non_negative_int, "FUSEFS_READ_AHEAD_KB",
        "kernel read size for the mount (root only; 0 keeps the kernel default)"))
    max_background: int = field(default=64, metadata=_meta(
        _non_negative_int, "FUSEFS_MAX_BACKGROUND",
        "kernel async requests in flight (root only; 0 keeps the kernel default)"))
    endpoint_url: str | None = field(
        default=None,
        metadata=_meta(
            _opt_str,
            "FUSEFS_ENDPOINT_URL",
            "S3-compatible endpoint URL (path-style addressing), or Azure account URL",
        ),
    )
    region: str | None = field(default=None, metadata=_meta(_opt_str, "FUSEFS_REGION", "S3 region"))
    profile: str | None = field(
        default=None, metadata=_meta(_opt_str, "FUSEFS_PROFILE", "AWS profile")
    )
    project: str | None = field(
        default=None,
        metadata=_meta(
            _opt_str, "FUSEFS_GCS_PROJECT", "GCS project (for the emulator or anonymous access)"
        ),
    )
    log_level: str = field(
        default="INFO",
        metadata=_meta(_log_level, "FUSEFS_LOG_LEVEL", "debug, info, warning or error"),
    )
    log_file: str | None = field(
        default=None,
        metadata=_meta(
            _opt_str, "FUSEFS_LOG_FILE", "log file (default: stderr, or syslog when daemonized)"
        ),
    )
    allow_other: bool = field(
        default=False,
        metadata=_meta(
            _parse_bool, "FUSEFS_ALLOW_OTHER", "let other users (and containers) read the mount"
        ),
    )
    read_only: bool = field(
        default=False,
        metadata=_meta(
            _parse_bool,
            "FUSEFS_READ_ONLY",
            "refuse every change with EROFS and show no write bits (control commands still work)",
        ),
    )
    sync_uploads: bool = field(
        default=False,
        metadata=_meta(
            _parse_bool,
            "FUSEFS_SYNC_UPLOADS",
            "close() returns only once the file is in the bucket (EIO, data kept, if not)",
        ),
    )
    uploads: int = field(
        default=16,
        metadata=_meta(_positive_int, "FUSEFS_UPLOADS", "files uploaded at once"),
    )
    upload_part_size: int = field(
        default=8 * MiB,
        metadata=_meta(
            _size, "FUSEFS_UPLOAD_PART_SIZE",
            "part size of multipart (S3), resumable (GCS) and block (Azure) uploads",
        ),
    )
    upload_parts: int = field(
        default=8,
        metadata=_meta(
            _positive_int, "FUSEFS_UPLOAD_PARTS", "parts of one big file uploaded at once"
        ),
    )
    upload_grace: float = field(
        default=30.0,
        metadata=_meta(
            _seconds, "FUSEFS_UPLOAD_GRACE",
            "seconds unmount and SIGTERM wait for pending uploads (the rest resume next mount)",
        ),
    )
    rename_limit: int = field(
        default=1000,
        metadata=_meta(
            _non_negative_int, "FUSEFS_RENAME_LIMIT",
            "most objects a folder rename moves; above it EXDEV (mv then copies)",
        ),
    )
    link_probe_size: int = field(
        default=4096,
        metadata=_meta(
            _size, "FUSEFS_LINK_PROBE_SIZE",
            "S3: listed objects up to this size whose metadata is unknown get one HEAD "
            "(could be an s3fs symlink or special file); 0: never (they show as files)",
        ),
    )
    metadata_probe: str = field(
        default="auto",
        metadata=_meta(
            _metadata_probe, "FUSEFS_METADATA_PROBE",
            "S3: how a file's mode, owner and mtime (object metadata, which S3 listings lack) "
            "are learnt on its first stat: auto (one GET of an object up to 1 MiB, kept as "
            "its first cached block; a HEAD for a larger one), head (a HEAD), off (never: "
            "defaults until read)",
        ),
    )
    uid: int | None = field(
        default=None,
        metadata=_meta(_opt_int, "FUSEFS_UID", "owner of files (default: the mounting user)"),
    )
    gid: int | None = field(
        default=None,
        metadata=_meta(
            _opt_int, "FUSEFS_GID", "group of files (default: the mounting user's group)"
        ),
    )
    file_mode: int = field(
        default=0o644, metadata=_meta(_octal_mode, "FUSEFS_FILE_MODE", "permission bits of files")
    )
    dir_mode: int = field(
        default=0o755,
        metadata=_meta(_octal_mode, "FUSEFS_DIR_MODE", "permission bits of directories"),
    )

    metrics: str | None = field(
        default=None,
        metadata=_meta(
            _host_port,
            "FUSEFS_METRICS",
            "serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
        ),
    )

    #: Where each value came from ("--cache-size", "FUSEFS_CACHE_SIZE_BYTES", "config file ...").
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def metadata_workers(self) -> int:
        """Metadata calls (HEAD, LIST) the filesystem runs at once."""
        return max(4, self.workers)

    @property
    def store_connections(self) -> int:
        """HTTP connections the store may hold at once: one per thread that can be in a store
        call (data fetches of reads and of prefetch/hints, metadata calls, list-ahead), plus a
        few for the control file."""
        return (self.workers + prefetch_concurrency(self.workers) + self.metadata_workers
                + LIST_AHEAD_PARALLEL + 4)  # fmt: skip

    @property
    def cache_enabled(self) -> bool:
        return self.cache_size > 0

    def describe(self) -> str:
        """One line of the effective values (logged at start); never secrets."""
        shown = []
        for f in fields(self):
            if f.name == "sources":
                continue
            v = getattr(self, f.name)
            if (
                f.name in ("cache_size", "block_size", "readahead_max")
                and isinstance(v, int)
                and v > 0
            ):
                v = human_size(v)
            elif f.name in ("file_mode", "dir_mode"):
                v = oct(v)
            elif f.name == "endpoint_url" and v:
                # user info or a query string (a SAS token) are secrets
                v = f"{redact_url(v)}{'?...' if '?' in v else ''}"
            shown.append(f"{f.name}={v}")
        return " ".join(shown)


SETTING_NAMES = tuple(f.name for f in fields(Settings) if f.name != "sources")


def setting_field(name: str) -> Any:
    """The dataclass field of one setting (its metadata: parser, env, help)."""
    return next(f for f in fields(Settings) if f.name == name)


def load_settings(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> Settings:
    """Build validated settings from the layers. ``cli`` holds only flags the user gave."""
    env = os.environ if env is None else env
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    env = {k: v for k, v in env.items() if v != ""}  # an empty variable counts as unset
    if config_path:
        path, named_by = config_path, "--config"
    elif env.get("FUSEFS_CONFIG_PATH"):
        path, named_by = env["FUSEFS_CONFIG_PATH"], "FUSEFS_CONFIG_PATH"
    else:
        path, named_by = default_config_path(env), ""  # optional
    file_values: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                file_values = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {path}: {exc}") from None
        file_values = file_values.get("fusefs", file_values)  # allow a [fusefs] table
        if not isinstance(file_values, dict):
            raise UserError(f"config file {path}: [fusefs] must be a table")
        file_values = {k.replace("-", "_"): v for k, v in file_values.items()}
        unknown = sorted(
            set(file_values) - set(SETTING_NAMES) - {"source", "mountpoint", "options"}
        )
        if unknown:
            raise UserError(f"config file {path}: unknown setting {unknown[0]!r}")
    elif named_by:
        raise UserError(f"{named_by}: config file {path} does not exist")

    settings = Settings()
    for name in SETTING_NAMES:
        f = setting_field(name)
        meta = f.metadata
        if name in cli:
            raw, source = cli[name], "--" + name.replace("_", "-")
        elif meta["env"] and meta["env"] in env:
            raw, source = env[meta["env"]], meta["env"]
        elif name in file_values:
            raw, source = file_values[name], f"{name} in {path}"
        else:
            continue
        in_file = source.endswith(f" in {path}")
        where = f"{name}={raw!r} in {path}" if in_file else f"{source}={raw!r}"
        if isinstance(raw, bool) and f.type != "bool":
            raise UserError(f"invalid {where}: not a true/false setting")
        try:
            setattr(settings, name, meta["parse"](raw))
        except (ValueError, TypeError) as exc:
            raise UserError(f"invalid {where}: {exc}") from None
        settings.sources[name] = source
    if settings.cache_size > 0 and settings.cache_size < settings.block_size * 2:
        src = settings.sources.get("cache_size", "cache size")
        raise UserError(
            f"invalid {src}: {human_size(settings.cache_size)} is smaller than two "
            f"blocks of {human_size(settings.block_size)}"
        )
    return settings
