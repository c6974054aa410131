"""Runs the groups of the wanted workloads (baselines once, then each system)."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable

from .dataset import (
    baselines_big_latency,
    baselines_loader,
    baselines_open,
    group_big_latency,
    group_loader,
    group_open,
)
from .harness import Bench
from .model import (
    GROUP_ORDER,
    GROUPS_NEEDED,
    LOADER_TTL,
    RSS_BUDGET_MIB,
    RSS_FLAT_FACTOR,
    Measure,
    Row,
    Spec,
)
from .peers import System
from .training import baselines_cores, baselines_loader_torch, group_cores, group_loader_torch
from .util import human, log
from .workloads import (
    baselines_big,
    baselines_list,
    baselines_prefetch,
    baselines_random,
    baselines_small,
    group_big,
    group_list,
    group_medium,
    group_prefetch,
    group_random,
    group_small,
)
from .writes import baselines_write, group_write, title_fields

GROUPS: dict[str, tuple[Callable[[Bench, System], dict[str, Measure]],
                        Callable[[Bench], dict[str, Measure]] | None]] = {
    "medium": (group_medium, None),
    "big": (group_big, baselines_big),
    "big_latency": (group_big_latency, baselines_big_latency),
    "open": (group_open, baselines_open),
    "loader": (group_loader, baselines_loader),
    "loader_torch": (group_loader_torch, baselines_loader_torch),
    "cores": (group_cores, baselines_cores),
    "random": (group_random, baselines_random),
    "small": (group_small, baselines_small),
    "prefetch": (group_prefetch, baselines_prefetch),
    "list": (group_list, baselines_list),
    "write": (group_write, baselines_write),
}  # fmt: skip


# --------------------------------------------------------------------------------- running


def rss_measure(b: Bench, system: str) -> Measure:
    """Peak VmHWM over all daemons of ``system``; flat if the big file's daemon peaked within
    20% of the medium file's."""
    per_mount = b.rss.get(system, {})
    if not per_mount:
        return Measure(None, error="no daemon was measured")
    peak = max(v["vm_hwm_mib"] for v in per_mount.values())
    medium = per_mount.get("medium", {}).get("vm_hwm_mib")
    big = per_mount.get("big", {}).get("vm_hwm_mib")
    flat = medium is not None and big is not None and big <= medium * RSS_FLAT_FACTOR
    notes = {"per_mount_vm_hwm_mib": {k: v["vm_hwm_mib"] for k, v in per_mount.items()},
             f"after_{human(b.sizes.medium).replace(' ', '')}": medium,
             f"after_{human(b.sizes.big).replace(' ', '')}": big, "flat": flat}  # fmt: skip
    return Measure(peak, notes, extra_ok=flat)


def build_rows(b: Bench, wanted: list[Spec]) -> dict[str, Row]:
    s, lat = b.sizes, b.args.latency_ms
    fmt = {"big": human(s.big), "medium": human(s.medium), "files": f"{s.small_files:,}",
           "fsize": human(s.small_size), "lat": f"{lat:g}", "objs": f"{s.list_objects:,}",
           "dirs": s.list_folders, "open_reads": f"{s.open_reads:,}",
           "open_files": f"{s.open_files:,}", "loader_files": f"{s.loader_files:,}",
           "ttl": f"{LOADER_TTL:g}", "epochs": s.loader_epochs, **title_fields(b)}  # fmt: skip
    st = b.store
    sdk = {"sdk": st.sdk, "download": st.download, "listing": st.listing}
    return {sp.id: Row(sp, sp.title.format(**fmt), sp.baseline.format(**sdk)) for sp in wanted}


def run_groups(b: Bench, systems: list[System], rows: dict[str, Row]) -> None:
    """Run every needed group: its baselines once, then each system; errors are recorded."""
    groups = {sp.group for sp in (r.spec for r in rows.values())}
    for sp in (r.spec for r in rows.values()):
        groups.update(GROUPS_NEEDED.get(sp.id, []))
    for group in [g for g in GROUP_ORDER if g in groups]:
        measure, baselines = GROUPS[group]
        if baselines is not None:
            log(f"{group}: baselines")
            for rid, m in _guarded(b, functools.partial(baselines, b), group, rows).items():
                if rid in rows:
                    rows[rid].baseline = m
        for system in systems:
            reason = system.unavailable()
            log(f"{group}: {system.name}" + (f" ({reason})" if reason else ""))
            results = (
                {rid: Measure(None, error=reason) for rid in rows}
                if reason
                else _guarded(b, functools.partial(measure, b, system), group, rows)
            )
            for rid, m in results.items():
                if rid in rows and rows[rid].spec.group == group:
                    rows[rid].results[system.name] = m
    if "rss" in rows:
        rows["rss"].baseline = Measure(float(RSS_BUDGET_MIB))
        for system in systems:
            rows["rss"].results[system.name] = rss_measure(b, system.name)


def _guarded(
    b: Bench, fn: Callable[[], dict[str, Measure]], group: str, rows: dict[str, Row]
) -> dict[str, Measure]:
    """Run one group; a failure becomes an error figure in each of its rows, not a crash,
    unless the store's server itself is gone (then every later figure would be an error too)."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
        traceback.print_exc()
        if not b.server_answers():
            raise RuntimeError(f"the {b.store.name} server at {b.direct_url} stopped answering"
                               ) from exc
        msg = f"{type(exc).__name__}: {exc}"[:300]
        return {rid: Measure(None, error=msg) for rid, r in rows.items() if r.spec.group == group}
