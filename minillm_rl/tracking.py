"""Run logs: metrics to JSONL (always), TensorBoard and W&B (when asked), progress lines, and small
atomic-write helpers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks (checkpoint and student manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write`` on a temporary file next to ``path`` (UTF-8 text, or bytes when ``binary``),
    then rename it over ``path``.

    Readers see the old file or the complete new one, never a partial write; if ``write`` raises,
    the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as tmp_file:
            write(tmp_file)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` to write a whole directory into; on success it is
    renamed to ``out_dir``, replacing an older one only once the new one is complete (renames,
    not copies), so readers never see a half-written directory. On failure it is removed and the
    old ``out_dir`` is untouched."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp_dir
        if out_dir.exists():
            old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old_dir / "previous")
            os.replace(tmp_dir, out_dir)
            shutil.rmtree(old_dir)
        else:
            os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def log_line(text: str) -> None:
    """One line of the run's log on stdout (flushed, so it reads well in a file or a Slurm log)."""
    print(f"minillm-rl: {text}", flush=True)


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class StageClock:
    """Adds the seconds of each ``measure(stage)`` block to ``timings[stage]``; a block nested in
    another is taken out of the outer one's time (e.g. the teacher's steps inside decoding), so
    the stages add up to the wall time. A no-op when ``timings`` is ``None``. ``sync`` runs at
    every block edge (e.g. ``torch.cuda.synchronize``, so GPU kernels count where they ran)."""

    def __init__(self, timings: dict[str, float] | None, sync: Callable[[], None] | None = None):
        self.timings, self.sync = timings, sync
        self._open: list[str] = []

    @contextlib.contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        if self.timings is None:
            yield
            return
        if self.sync is not None:
            self.sync()
        started = time.perf_counter()
        self._open.append(stage)
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            seconds = time.perf_counter() - started
            self._open.pop()
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds
            if self._open:
                self.timings[self._open[-1]] = self.timings.get(self._open[-1], 0.0) - seconds


class ProgressLine:
    """Progress of a long loop as whole lines: at most one every ``interval_s`` seconds (and the
    last one), never carriage-return frames, so a log written to a file or read by ``tail -f``
    stays readable. ``minillm: step 40/128 (31%) loss=2.31 | 1.9 s/step, 2m47s left``."""

    def __init__(self, name: str, total: int, unit: str = "steps", start: int = 0, interval_s: float = 30.0,
                 enabled: bool = True):
        self.name, self.total, self.unit, self.interval_s, self.enabled = name, total, unit, interval_s, enabled
        self.start = self.position = start
        self.started = self._last_print = time.monotonic()
        self._printed_position = None

    def update(self, position: int, **values: Any) -> None:
        """The loop reached ``position`` (of ``total``); ``values`` are shown with it."""
        self.position = position
        now = time.monotonic()
        if self.enabled and (now - self._last_print >= self.interval_s or position >= self.total):
            self._print(now, values)

    def _print(self, now: float, values: dict[str, Any]) -> None:
        done = self.position - self.start
        per_unit = (now - self.started) / done if done > 0 else float("nan")
        left = per_unit * (self.total - self.position)
        shown = " ".join(f"{key}={_format_value(value)}" for key, value in values.items())
        timing = f"{per_unit:.3g} s/{self.unit.rstrip('s')}, {_duration(left)} left" if done > 0 else "starting"
        percent = 100 * self.position / max(self.total, 1)
        log_line(f"{self.name}: {self.unit.rstrip('s')} {self.position}/{self.total} ({percent:.0f}%)"
                 f"{' ' + shown if shown else ''} | {timing}")
        self._last_print, self._printed_position = now, self.position

    def close(self) -> None:
        self.enabled = False


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


REPORT_TARGETS = ("tensorboard", "wandb")


class MetricsLogger:
    """Appends ``{"stage", "step", "time", **metrics}`` lines to ``metrics.jsonl`` (always) and
    mirrors numeric values under ``stage/name`` to the targets in ``report_to``: TensorBoard
    (``tensorboard/`` in the run directory) and Weights & Biases (its own settings, e.g.
    ``WANDB_PROJECT`` and ``WANDB_MODE=offline``, which works without a network; the run's files
    go under ``wandb/`` in the run directory)."""

    def __init__(self, run_dir: str | os.PathLike, report_to: tuple[str, ...] | list[str] = ("tensorboard",),
                 run_name: str | None = None, config: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        unknown = set(report_to) - set(REPORT_TARGETS)
        if unknown:
            raise ValueError(f"report_to: unknown target(s) {sorted(unknown)}; expected some of {REPORT_TARGETS}")
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = self._wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard: a core requirement

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            self._wandb = wandb.init(dir=str(self.run_dir), name=run_name, config=config,
                                     id=_wandb_run_id(self.run_dir), resume="allow")

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        record = {"stage": stage, "step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numeric = {f"{stage}/{name}": value for name, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self._tb is not None:
            for name, value in numeric.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None and numeric:
            # W&B wants one increasing step per run; phases restart their step count, so the
            # phase's own step goes along as a metric.
            self._wandb.log({**numeric, f"{stage}/step": step})

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_run_id(run_dir: Path) -> str:
    """One W&B run per run directory, kept across resumes (stored in ``wandb_run_id``)."""
    id_file = run_dir / "wandb_run_id"
    if id_file.is_file():
        return id_file.read_text(encoding="utf-8").strip()
    run_id = os.urandom(8).hex()
    atomic_write_text(id_file, run_id + "\n")
    return run_id
