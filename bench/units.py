"""Benchmarks in units that land: each unit of work, when it finishes, writes one small JSON result
file (committed to the repository), so an interrupted benchmark keeps everything it finished.

A :class:`Unit` is one piece of work (a training run and its test, a teacher evaluation, a frontier
point) that takes at most ~40 minutes on the machine it is sized for. :func:`run_units` runs, in the
given order, the units whose result file is missing: with a budget it starts none whose cost says it
cannot finish in the minutes left. A unit's cost is measured: the longest ``wall_seconds`` among the
existing result files of the same ``kind`` (the longest, so a budget is not overrun by a slow
seed), or the unit's stated ``estimate_minutes`` when no result of its kind exists yet.

Result file (:func:`write_result`, atomic): the unit's own payload plus ``format``/``version``,
``unit``, ``kind`` and ``provenance``: git commit and whether the tracked tree differed from it
(with a SHA-256 of ``git diff HEAD`` when it did), wall time, start time and the machine (CPU
cores, CPU model, torch threads, GPU). :func:`read_result` refuses a file that is not one in one
line (``ValueError`` naming the file): a result file is committed data, so a damaged one (a merge
conflict, a hand edit) is for a person to fix, never silently re-run over.

Used by ``bench/bench_quality.py`` and shared with the heal frontier.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from minillm_rl.tracking import atomic_write_json

RESULT_FORMAT = "minillm-rl bench unit"
RESULT_VERSION = 1
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"  # where the units' result files are committed
UNIT_MINUTES = 40  # what a unit is sized for: an interrupted session loses at most this much work


@dataclass
class Unit:
    """One unit of work.

    ``name``: shown in progress lines (e.g. ``"minillm/seed1"``); ``kind``: units of one kind have
    comparable cost (e.g. ``"quality-cpu/minillm"``); ``result_path``: its result file; ``work()``:
    does the work and returns the payload (JSON-ready); ``needs``: names of units that must be done
    first; ``pending()``: whether it must run (default: its result file is missing) — a unit whose
    product other pending units need, and that product is gone, may say yes with a result there.
    ``settings``: what makes its result what it is (JSON-ready, no machine-specific paths); written
    into the result file, and an existing result with other settings is refused, not reused.
    """

    name: str
    kind: str
    result_path: Path
    work: Callable[[], dict[str, Any]]
    estimate_minutes: float
    needs: tuple[str, ...] = ()
    pending: Callable[[], bool] | None = None
    settings: dict[str, Any] | None = None

    def is_pending(self) -> bool:
        return self.pending() if self.pending is not None else not self.result_path.is_file()


def read_result(path: Path) -> dict[str, Any] | None:
    """The result file at ``path``, or ``None`` when there is none; one that is not a result file
    (not JSON, another format or version, no wall time) raises a one-line ``ValueError``."""
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: corrupt result file ({type(err).__name__}: {err}); expected the JSON a "
                         "benchmark unit writes (restore it from git, or delete it to re-run the unit)") from None
    if not isinstance(payload, dict) or payload.get("format") != RESULT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise ValueError(f"{path}: not a benchmark unit result (format {found!r}); expected {RESULT_FORMAT!r}")
    if payload.get("version") != RESULT_VERSION:
        raise ValueError(f"{path}: result version {payload.get('version')!r}; this code reads version {RESULT_VERSION}")
    wall = (payload.get("provenance") or {}).get("wall_seconds")
    if not isinstance(wall, (int, float)) or isinstance(wall, bool) or not wall >= 0:
        raise ValueError(f"{path}: provenance.wall_seconds is {wall!r}; expected a number of seconds >= 0")
    return payload


def check_settings(unit: Unit, result: dict[str, Any]) -> None:
    """Refuse (one-line ``ValueError``) ``unit``'s existing ``result`` when it was made with other
    settings than the unit's: mixing them in one table would compare unlike things."""
    if unit.settings is None:
        return
    recorded = json.loads(json.dumps(result.get("settings")))
    planned = json.loads(json.dumps(unit.settings))  # as a result file holds them (tuples as lists)
    if recorded == planned:
        return
    key = ""
    while isinstance(recorded, dict) and isinstance(planned, dict):  # down to the first differing leaf
        name = next(name for name in sorted({*recorded, *planned}) if recorded.get(name) != planned.get(name))
        key, recorded, planned = f"{key}.{name}" if key else name, recorded.get(name), planned.get(name)
    raise ValueError(f"{unit.result_path}: made with {key or 'settings'}={recorded!r}, this plan has "
                     f"{planned!r}; delete it to re-run the unit with this plan, or write this plan's results "
                     "elsewhere (--results)")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def git_state() -> dict[str, Any]:
    """``{"commit", "dirty", "diff_sha256"}`` of the code: tracked files, except the result files
    under ``bench/results/`` — they are outputs, and a re-run unit's replaced file is still uncommitted
    when the next unit starts (untracked files, such as new result files, never count); ``commit`` is
    ``None`` outside a git checkout."""
    try:
        commit = _git("rev-parse", "HEAD").strip()
        diff = _git("diff", "HEAD", "--binary", "--", ".", f":(exclude){RESULTS.relative_to(REPO).as_posix()}")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "diff_sha256": None}
    return {"commit": commit, "dirty": bool(diff),
            "diff_sha256": hashlib.sha256(diff.encode("utf-8")).hexdigest() if diff else None}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine a unit ran on: CPU cores usable by this process, CPU model, torch's intra-op
    threads here, the GPU's name (``None`` without one)."""
    import torch

    return {"cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": _cpu_model(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform()}


def write_result(unit: Unit, payload: dict[str, Any], wall_seconds: float, started: datetime,
                 git: dict[str, Any]) -> dict[str, Any]:
    """Write ``unit``'s result file atomically: ``payload`` plus the format and the provenance.
    ``git``: :func:`git_state` when the unit started (the code that ran). Returns what was written."""
    reserved = {"format", "version", "unit", "kind", "settings", "provenance"} & set(payload)
    if reserved:
        raise ValueError(f"unit {unit.name}: its payload uses the reserved keys {sorted(reserved)}")
    record = {"format": RESULT_FORMAT, "version": RESULT_VERSION, "unit": unit.name, "kind": unit.kind,
              **({} if unit.settings is None else {"settings": unit.settings}), **payload,
              "provenance": {**git, "wall_seconds": round(wall_seconds, 1),
                             "started_utc": started.isoformat(timespec="seconds"), "machine": machine()}}
    atomic_write_json(unit.result_path, record)
    return record


def measured_minutes(units: Sequence[Unit]) -> dict[str, float]:
    """``{kind: minutes}``: the longest wall time among the existing result files of each kind
    (each checked: :func:`read_result`, :func:`check_settings`)."""
    longest: dict[str, float] = {}
    for unit in units:
        result = read_result(unit.result_path)
        if result is not None:
            check_settings(unit, result)
            minutes = result["provenance"]["wall_seconds"] / 60
            longest[unit.kind] = max(longest.get(unit.kind, 0.0), minutes)
    return longest


@dataclass
class Summary:
    """What :func:`run_units` did, by unit name."""

    done: list[str] = field(default_factory=list)  # finished in this invocation
    already: list[str] = field(default_factory=list)  # result file there before
    skipped_for_budget: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # a unit it needs was not done
    planned: list[str] = field(default_factory=list)  # --dry-run: would be started
    unreached: list[str] = field(default_factory=list)  # a unit failed: it and the units after it

    @property
    def remaining(self) -> list[str]:
        return [*self.skipped_for_budget, *self.blocked, *self.planned, *self.unreached]

    def line(self) -> str:
        return (f"units: {len(self.done)} done now, {len(self.already)} already done, "
                f"{len(self.skipped_for_budget)} skipped for budget, {len(self.blocked)} blocked by those, "
                f"{len(self.remaining)} remaining")


def run_units(units: Sequence[Unit], budget_minutes: float | None = None, dry_run: bool = False,
              clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] = print,
              budget_started: float | None = None) -> Summary:
    """Run the pending ``units`` in order (see the module docstring); ``dry_run``: say what would
    be started, start nothing. ``budget_started``: the ``clock()`` value the budget counts from
    (default: now), so the work a caller did before its units (e.g. building a model) counts too.
    Every existing result file is read first, so a corrupt one, or one made with other settings,
    stops the run before any work (``ValueError``). A unit that raises stops the run (its result
    file is not written; the units before it keep theirs). A unit over :data:`UNIT_MINUTES` is
    reported as such (cut it smaller)."""
    names = {unit.name for unit in units}
    for unit in units:
        unknown = set(unit.needs) - names
        if unknown:
            raise ValueError(f"unit {unit.name} needs {sorted(unknown)}, which are not in the plan")
    minutes = measured_minutes(units)
    started_at, summary, available = clock() if budget_started is None else budget_started, Summary(), set()
    dry_run_minutes = 0.0  # the costs of the units a dry run would have started
    for index, unit in enumerate(units, start=1):
        where = f"[{index}/{len(units)}] {unit.name}"
        if not unit.is_pending():
            summary.already.append(unit.name)
            available.add(unit.name)
            continue
        missing = [need for need in unit.needs if need not in available]
        cost = minutes.get(unit.kind, unit.estimate_minutes)
        source = "measured" if unit.kind in minutes else "estimated"
        if missing:
            summary.blocked.append(unit.name)
            log(f"{where}: blocked (needs {', '.join(missing)})")
            continue
        left = math.inf if budget_minutes is None else \
            budget_minutes - (clock() - started_at) / 60 - dry_run_minutes
        if cost > left:
            summary.skipped_for_budget.append(unit.name)
            log(f"{where}: skipped for budget ({source} {cost:.1f} min > {left:.1f} min left)")
            continue
        if dry_run:
            summary.planned.append(unit.name)
            dry_run_minutes += cost
            available.add(unit.name)  # as if it ran: the plan shows what could follow
            log(f"{where}: would start ({source} {cost:.1f} min)")
            continue
        log(f"{where}: starting ({source} {cost:.1f} min; {left:.1f} min left)" if budget_minutes is not None
            else f"{where}: starting ({source} {cost:.1f} min)")
        git, begun, begun_utc = git_state(), clock(), datetime.now(timezone.utc)
        try:
            payload = unit.work()
        except BaseException:  # a failure or an interrupt: say so, and what landed before it
            log(f"{where}: stopped after {(clock() - begun) / 60:.1f} min; no result written")
            summary.unreached = [later.name for later in units[index - 1:] if later.is_pending()]
            log(summary.line())
            raise
        wall = clock() - begun
        write_result(unit, payload, wall, begun_utc, git)
        minutes[unit.kind] = max(minutes.get(unit.kind, 0.0), wall / 60)
        summary.done.append(unit.name)
        available.add(unit.name)
        log(f"{where}: done in {wall / 60:.1f} min -> {unit.result_path}"
            + (f" (over the {UNIT_MINUTES}-minute unit size)" if wall > 60 * UNIT_MINUTES else ""))
    log(summary.line())
    return summary
