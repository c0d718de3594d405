"""One failure reads as one line: ``minillm-rl: run failed: <what, where>; last good checkpoint: <path or none>``.

When one learner rank fails (a full disk while saving, an I/O error, an exception in a phase), the
others fail as a consequence (gloo's "Connection closed by peer", collective timeouts), and the
launcher stops them: without care the user reads a screen of tracebacks from every rank and no line
saying what happened. Here:

- Every rank runs its training inside :func:`rank_failures`: an exception (other than bad input,
  ``ValueError``, which keeps its own one-line report) is recorded as ``rank<R>.json`` (time, rank,
  type, message, the innermost project frame) plus ``rank<R>.traceback`` in the *failure directory*,
  and the rank exits 1.
- Under ``minillm-rl train``'s own local launch (:func:`~minillm_rl.cli.launch.relaunch_under_deepspeed`)
  the failure directory is a fresh temporary directory (not the run's output directory: that may be
  the full disk), named to the ranks through :data:`FAILURE_DIR_ENV`; the ranks print nothing, and
  the launching process prints one line for the *first* failure (the earliest record: the cause;
  later ones are its consequences), pointing at the tracebacks, which it moves into
  ``<output.dir>/logs/`` when it can.
- Under an external launcher (multi-node ``deepspeed``, Slurm) there is no launching ``minillm-rl``
  process: each failing rank prints its own one line, and its traceback goes to
  ``<output.dir>/logs/`` (or only the line, when that cannot be written).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from minillm_rl.errors import RunFailed
from minillm_rl.runtime.checkpointing import checkpoint_problem, checkpoint_tags

FAILURE_DIR_ENV = "MINILLM_RL_FAILURE_DIR"
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


class RankFailed(RunFailed):
    """A rank's failure, already recorded for the launching process to report (printed by no one here)."""

    reported_elsewhere = True


def last_good_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint under ``output_dir/checkpoints`` that passes verification (what
    ``--resume auto`` would take), or ``None``."""
    checkpoint_dir = Path(output_dir) / "checkpoints"
    try:
        tags = checkpoint_tags(checkpoint_dir)
    except OSError:
        return None
    for tag in reversed(tags):
        if checkpoint_problem(checkpoint_dir / tag, check_hashes=False) is None:
            return checkpoint_dir / tag
    return None


def _where(error: BaseException) -> str:
    """``file:line in function`` of the innermost frame in this package (else the innermost frame)."""
    here = Path(__file__).resolve()  # the frame that caught it is not where it happened
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if Path(frame.filename).resolve() != here and not frame.filename.endswith("contextlib.py")]
    if not frames:
        return "unknown location"
    ours = [frame for frame in frames if Path(frame.filename).resolve().is_relative_to(_PACKAGE_ROOT)]
    frame = (ours or frames)[-1]
    path = Path(frame.filename)
    shown = path.resolve().relative_to(_PACKAGE_ROOT.parent) if ours else path.name
    return f"{shown}:{frame.lineno} in {frame.name}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe(error: BaseException, rank: int) -> str:
    """What failed and where, in one line (without the checkpoint part)."""
    # The run's own failures (RunFailed, its timeouts) already say what failed in their message.
    what = str(error) if isinstance(error, (RunFailed, TimeoutError)) else f"{type(error).__name__}: {error}"
    return _one_line(f"rank {rank}: {what} ({_where(error)})")


def write_hint(error: BaseException, output_dir: str | os.PathLike) -> str:
    """What a failed ``torch.save`` most likely means, with the free space under ``output_dir``:
    torch's zip writer reports a full disk without an errno (``[enforce fail at
    inline_container.cc:672] . unexpected pos 128 vs 0``), so the rank that hits it first would
    otherwise report no cause a user can act on. Empty for any other error."""
    if not (isinstance(error, RuntimeError) and "inline_container.cc" in str(error)):
        return ""
    existing = Path(output_dir).resolve()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return ""
    return f"; torch could not write a file under {output_dir} ({free} bytes free there: a full disk?)"


def failure_line(record: dict, output_dir: str | os.PathLike, logs: str) -> str:
    checkpoint = last_good_checkpoint(output_dir)
    return f"{record['what']}; last good checkpoint: {checkpoint or 'none'}; tracebacks: {logs}"


def _write(path: Path, text: str) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return True
    except OSError:
        return False


@contextmanager
def rank_failures(output_dir: str | os.PathLike, rank: int) -> Iterator[None]:
    """Run a rank's training; record and report a failure as the module docstring says."""
    try:
        yield
    except ValueError:
        raise  # bad input: its own one-line report, exit 2
    except Exception as error:  # noqa: BLE001 - every failure of a rank is reported, as one line
        record = {"time": time.time(), "rank": rank, "type": type(error).__name__,
                  "what": describe(error, rank) + write_hint(error, output_dir)}
        trace = "".join(traceback.format_exception(error))
        failure_dir = os.environ.get(FAILURE_DIR_ENV)
        if failure_dir:
            _write(Path(failure_dir) / f"rank{rank}.traceback", trace)
            # The record last: the launching process reads only complete records.
            _write(Path(failure_dir) / f"rank{rank}.json", json.dumps(record))
            raise RankFailed(record["what"]) from None
        log = Path(output_dir) / "logs" / f"rank{rank}.traceback"
        logs = str(log) if _write(log, trace) else "not written (the output directory refused it)"
        raise RunFailed(failure_line(record, output_dir, logs)) from None


def new_failure_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="minillm-rl-failures-"))


def first_failure(failure_dir: Path, output_dir: str | os.PathLike) -> str | None:
    """The one line for the earliest rank failure recorded in ``failure_dir`` (``None``: none was).
    The tracebacks are moved to ``<output_dir>/logs/`` when that can be written, else left where
    they are; the line names the place."""
    records = []
    for path in failure_dir.glob("rank*.json"):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue  # a rank killed while writing: its traceback file, if any, is still there
    if not records:
        shutil.rmtree(failure_dir, ignore_errors=True)
        return None
    first = min(records, key=lambda record: record["time"])
    logs = Path(output_dir) / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        for trace in failure_dir.glob("rank*.traceback"):
            shutil.copyfile(trace, logs / trace.name)
        shutil.rmtree(failure_dir, ignore_errors=True)
        where = f"{logs}/rank*.traceback"
    except OSError:
        where = f"{failure_dir}/rank*.traceback"
    others = len(records) - 1
    line = failure_line(first, output_dir, where)
    return line + (f" ({others} other rank(s) failed after it, as a consequence)" if others else "")
