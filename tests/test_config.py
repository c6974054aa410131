"""Layered configuration: flag > environment > config file > default, validated at the edge."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fusefs.config import GiB, KiB, MiB, Settings, default_cache_dir, load_settings
from fusefs.errors import UserError

ISSUE_ENV = {  # the variables the documentation promises, and the setting each one sets
    "FUSEFS_CACHE_DIR": ("cache_dir", "/var/cache/x", "/var/cache/x"),
    "FUSEFS_CACHE_SIZE_BYTES": ("cache_size", "20G", 20 * GiB),
    "FUSEFS_BLOCK_SIZE_BYTES": ("block_size", "1M", MiB),
    "FUSEFS_NUM_WORKERS": ("workers", "4", 4),
    "FUSEFS_METADATA_TTL": ("metadata_ttl", "2.5", 2.5),
    "FUSEFS_NEGATIVE_TTL": ("negative_ttl", "0", 0.0),
    "FUSEFS_READAHEAD_MAX_BYTES": ("readahead_max", "16M", 16 * MiB),
    "FUSEFS_LOG_LEVEL": ("log_level", "debug", "DEBUG"),
    "FUSEFS_ALLOW_OTHER": ("allow_other", "yes", True),
    "FUSEFS_METADATA_PROBE": ("metadata_probe", "HEAD", "head"),
}


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults_with_nothing_given(tmp_path: Path) -> None:
    s = load_settings({}, env={"HOME": str(tmp_path)})  # no ~/.config/fusefs/config.toml
    assert s == Settings()
    assert (s.cache_size, s.block_size, s.workers, s.metadata_ttl) == (32 * GiB, 8 * MiB, 16, 60)
    assert s.cache_dir == default_cache_dir() and s.sources == {}


@pytest.mark.parametrize("var", sorted(ISSUE_ENV))
def test_every_documented_variable(var: str) -> None:
    name, raw, value = ISSUE_ENV[var]
    s = load_settings({}, env={var: raw}, config_path=os.devnull)
    assert getattr(s, name) == value and s.sources[name] == var


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", 'cache_size = "1G"\nblock_size = "128K"\nworkers = 3\n'
                                      'metadata_ttl = 7\ncache-dir = "~/from-file"\n')
    env = {"FUSEFS_BLOCK_SIZE_BYTES": "256K", "FUSEFS_NUM_WORKERS": "5", "HOME": "/home/u"}
    s = load_settings({"workers": "9"}, env=env, config_path=cfg)
    assert s.workers == 9 and s.sources["workers"] == "--workers"  # flag beats env and file
    assert s.block_size == 256 * KiB and s.sources["block_size"] == "FUSEFS_BLOCK_SIZE_BYTES"
    assert s.cache_size == GiB and s.sources["cache_size"] == f"cache_size in {cfg}"
    assert s.metadata_ttl == 7.0
    assert s.cache_dir == os.path.expanduser("~/from-file")  # dashed keys are accepted too
    assert s.negative_ttl == Settings().negative_ttl and "negative_ttl" not in s.sources


def test_config_file_locations(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config/fusefs").mkdir(parents=True)
    write(home / ".config/fusefs/config.toml", "[fusefs]\nworkers = 2\n")
    assert load_settings({}, env={"HOME": str(home)}).workers == 2  # the default location
    xdg = tmp_path / "xdg"
    (xdg / "fusefs").mkdir(parents=True)
    write(xdg / "fusefs/config.toml", "workers = 6\n")
    assert load_settings({}, env={"HOME": str(home), "XDG_CONFIG_HOME": str(xdg)}).workers == 6
    other = write(tmp_path / "other.toml", "workers = 7\n")
    env = {"HOME": str(home), "FUSEFS_CONFIG_PATH": other}
    assert load_settings({}, env=env).workers == 7  # FUSEFS_CONFIG_PATH beats the default
    third = write(tmp_path / "third.toml", "workers = 8\n")
    assert load_settings({}, env=env, config_path=third).workers == 8  # --config beats both
    with pytest.raises(UserError, match="^FUSEFS_CONFIG_PATH: config file /nope.toml does"):
        load_settings({}, env={"FUSEFS_CONFIG_PATH": "/nope.toml"})
    with pytest.raises(UserError, match="^--config: config file /nope.toml does not exist"):
        load_settings({}, env=env, config_path="/nope.toml")


def test_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    s = load_settings({}, env={"FUSEFS_CACHE_DIR": "", "FUSEFS_NUM_WORKERS": "",
                               "FUSEFS_CONFIG_PATH": "", "HOME": str(tmp_path)})
    assert s.cache_dir == default_cache_dir() and s.workers == 16


@pytest.mark.parametrize("raw", ["0", "-1", 0, -1])
def test_cache_size_zero_or_minus_one_disables_the_cache(raw: object) -> None:
    s = load_settings({"cache_size": raw}, env={}, config_path=os.devnull)
    assert not s.cache_enabled


BAD = [  # (flags, env, config file text, the start of the one-line message)
    ({"cache_size": "-2"}, {}, "", "invalid --cache-size='-2': must be a size, or 0 / -1"),
    ({}, {"FUSEFS_CACHE_SIZE_BYTES": "huge"}, "", "invalid FUSEFS_CACHE_SIZE_BYTES='huge': "),
    ({}, {"FUSEFS_NUM_WORKERS": "0"}, "", "invalid FUSEFS_NUM_WORKERS='0': must be a positive"),
    ({}, {"FUSEFS_METADATA_TTL": "-1"}, "", "invalid FUSEFS_METADATA_TTL='-1': must be >= 0"),
    ({}, {}, 'block_size = "1K"', "invalid block_size='1K' in {cfg}: must be between 64K"),
    ({}, {}, "workers = true", "invalid workers=True in {cfg}: not a true/false setting"),
    ({}, {}, 'readahead_max = "-8M"', "invalid readahead_max='-8M' in {cfg}: must be a size"),
    ({}, {}, 'log_level = "loud"', "invalid log_level='loud' in {cfg}: must be one of"),
    ({}, {}, 'metadata_probe = "get"', "invalid metadata_probe='get' in {cfg}: must be one of "
     "auto, head, off"),
    ({}, {}, "cache_sise = 5", "config file {cfg}: unknown setting 'cache_sise'"),
    ({}, {}, "workers = [", "config file {cfg}: "),
    ({"cache_size": "1M"}, {}, "", "invalid --cache-size: 1.0MB is smaller than two blocks"),
]


@pytest.mark.parametrize(("cli", "env", "text", "message"), BAD)
def test_invalid_values_name_the_setting_and_source(
    tmp_path: Path, cli: dict[str, str], env: dict[str, str], text: str, message: str
) -> None:
    cfg = write(tmp_path / "c.toml", text)
    with pytest.raises(UserError) as ei:
        load_settings(cli, env=env, config_path=cfg)
    msg = str(ei.value)
    assert msg.startswith(message.format(cfg=cfg)), msg
    assert "\n" not in msg


def test_mount_rejects_a_bad_value_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "objects").mkdir()
    env = {**os.environ, "FUSEFS_CONFIG_PATH": os.devnull, "FUSEFS_BLOCK_SIZE_BYTES": "12"}
    r = subprocess.run(
        [sys.executable, "-m", "fusefs", "mount", f"file://{tmp_path}/objects",
         str(tmp_path / "mnt"), "--foreground"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "fusefs: invalid FUSEFS_BLOCK_SIZE_BYTES='12': must be between 64K and 256M, got '12'"
    ]
    assert not os.path.ismount(tmp_path / "mnt")


def test_a_real_mount_takes_each_setting_from_its_layer(tmp_path: Path, mount) -> None:
    from conftest import make_local_bucket

    bucket = make_local_bucket(tmp_path / "objects")
    bucket.put("f.bin", os.urandom(300_000))
    cfg = write(tmp_path / "fusefs.toml", '[fusefs]\ncache_size = "64M"\nblock_size = "128K"\n'
                                          "workers = 3\nmetadata_ttl = 42\n")
    env = {**bucket.env, "FUSEFS_CONFIG_PATH": cfg, "FUSEFS_BLOCK_SIZE_BYTES": "512K",
           "FUSEFS_NUM_WORKERS": "5"}
    m = mount(dataclasses.replace(bucket, env=env), "--workers", "7")
    s = m.stats()
    assert s["cache_size"] == 64 * MiB  # the file
    assert s["block_size"] == 512 * KiB  # the environment beats the file
    settings_line = next(line for line in m.log_text().splitlines() if "workers=" in line)
    assert re.search(r"\bworkers=7\b", settings_line)  # the flag beats both
    assert re.search(r"\bmetadata_ttl=42.0\b", settings_line)
    assert (m.path / "f.bin").stat().st_size == 300_000


def test_describe_hides_a_query_string_of_the_endpoint() -> None:
    s = load_settings({"endpoint_url": "https://acct.blob.core.windows.net/?sv=1&sig=SECRET"},
                      env={})
    assert "SECRET" not in s.describe()
    assert "endpoint_url=https://acct.blob.core.windows.net/?..." in s.describe()
