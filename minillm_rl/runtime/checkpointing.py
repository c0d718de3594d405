"""Checkpoints you can trust: tags, a manifest with checksums, verification, resume choice, rotation.

A checkpoint is a DeepSpeed tag directory ``checkpoints/<tag>/`` (module, optimizer and ZeRO
partitions, one file set per rank). DeepSpeed writes those files in place, so a crash mid-save
leaves a directory that looks like a checkpoint but is not one. Hence:

- After every rank has finished its part of the save, rank 0 writes ``<tag>/manifest.json``
  atomically: every file of the tag with its size and sha256, plus the run's progress. A tag
  without a manifest is *incomplete*; one whose files no longer match it is *corrupt*.
- Resuming verifies before loading. ``--resume auto`` takes the newest tag that verifies and
  says in one line which newer ones it skipped and why; an explicit tag directory that fails is
  an error (the user asked for that one). DeepSpeed's own ``latest`` file is not trusted: it is
  written before our manifest.
- Rotation keeps ``output.keep_checkpoints`` verified checkpoints: the one just written and the
  newest verified ones before it. Tags newer than the current one (left by an abandoned run that
  was resumed from an earlier tag) are left alone; they are overwritten when the run gets there.
  The tag holding the best validation Rouge-L of the final phase is protected (its HF export is
  ``best/``; the DeepSpeed tag lets training be continued from it). ``best/`` and
  ``sft_best_loss/`` live outside ``checkpoints/`` and are never touched.

Cost: verification reads every byte of the checkpoint (sha256, 1 MiB chunks, roughly 1 GB/s per
core), i.e. seconds for small students and minutes for multi-GB optimizer states; it runs once
per save and once per resume, on rank 0. Rank 0 must see every rank's files (a shared file
system, as DeepSpeed's multi-node resume needs anyway).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minillm_rl.tracking import atomic_write_json, file_sha256

MANIFEST_NAME = "manifest.json"


def checkpoint_tag(phase_index: int, phase: str, phase_step: int) -> str:
    """Tags sort in run order: phase index first, then step."""
    return f"phase{phase_index}-{phase}-step{phase_step:08d}"


def parse_checkpoint_tag(tag: str) -> tuple[int, str, int]:
    """``(phase_index, phase, phase_step)`` of a :func:`checkpoint_tag`."""
    try:
        head, phase, step = tag.split("-")
        return int(head.removeprefix("phase")), phase, int(step.removeprefix("step"))
    except ValueError:
        raise ValueError(f"checkpoint tag {tag!r}: expected phase<i>-<phase>-step<n>") from None


def best_rouge_tag(phases: list[str], phase_index: int, best_rouge: dict[str, dict]) -> frozenset[str]:
    """The tag to keep out of rotation: the best validation Rouge-L step of the final phase
    (``best_rouge[phase]["step"]``), once the run is in that phase; empty otherwise."""
    final = len(phases) - 1
    best = best_rouge.get(phases[final])
    if phase_index != final or best is None:
        return frozenset()
    return frozenset([checkpoint_tag(final, phases[final], best["step"])])


def _run_order(tag: str) -> tuple[int, int]:
    index, _, step = parse_checkpoint_tag(tag)
    return index, step


def checkpoint_tags(checkpoint_dir: str | Path) -> list[str]:
    """Tag directories under ``checkpoint_dir``, newest (in run order) first; other entries
    (``latest``, stray files, non-tag directories) are ignored."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    tags = []
    for entry in directory.iterdir():
        try:
            parse_checkpoint_tag(entry.name)
        except ValueError:
            continue
        if entry.is_dir():
            tags.append(entry.name)
    return sorted(tags, key=_run_order, reverse=True)



def _checkpoint_files(tag_dir: Path) -> list[str]:
    """Relative paths of the tag's files, without the manifest and its temporary files."""
    return sorted(str(path.relative_to(tag_dir)) for path in tag_dir.rglob("*")
                  if path.is_file() and not path.name.startswith(f".{MANIFEST_NAME}.") and path.name != MANIFEST_NAME)


def write_manifest(tag_dir: str | Path, summary: dict[str, Any]) -> None:
    """Record size and sha256 of every file in ``tag_dir`` plus ``summary`` (e.g. the progress)
    in ``tag_dir/manifest.json``, atomically. Call once every rank's files are written."""
    tag_dir = Path(tag_dir)
    files = {name: {"size": (tag_dir / name).stat().st_size, "sha256": file_sha256(tag_dir / name)}
             for name in _checkpoint_files(tag_dir)}
    if not files:
        raise ValueError(f"write_manifest: {tag_dir} holds no checkpoint files")
    atomic_write_json(tag_dir / MANIFEST_NAME, {"tag": tag_dir.name, "files": files, "summary": summary})


def discard_manifest(tag_dir: str | Path) -> None:
    """Mark ``tag_dir`` incomplete before its files are (re)written."""
    (Path(tag_dir) / MANIFEST_NAME).unlink(missing_ok=True)


def checkpoint_problem(tag_dir: str | Path, check_hashes: bool = True) -> str | None:
    """Why ``tag_dir`` cannot be trusted (one phrase), or ``None`` when every file listed in its
    manifest is present with the recorded size and (``check_hashes``) sha256."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return "no such directory"
    try:
        manifest = json.loads((tag_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = manifest["files"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except FileNotFoundError:
        return f"no {MANIFEST_NAME}: the save did not finish"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"unreadable {MANIFEST_NAME}"
    if not entries:
        return f"{MANIFEST_NAME} lists no files"
    for name, size, sha256 in entries:
        path = tag_dir / name
        if not path.is_file():
            return f"file {name}: missing"
        actual = path.stat().st_size
        if actual != size:
            return f"file {name}: size {actual} != {size} bytes in the manifest"
        if check_hashes and file_sha256(path) != sha256:
            return f"file {name}: sha256 mismatch"
    return None


def read_manifest_summary(tag_dir: str | Path) -> dict[str, Any]:
    """The ``summary`` a verified checkpoint's manifest was written with."""
    return json.loads((Path(tag_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))["summary"]


def pick_resume_tag(checkpoint_dir: str | Path, warn: Callable[[str], None]) -> str | None:
    """The newest tag under ``checkpoint_dir`` that verifies; ``None`` when there is no tag.

    Newer tags that fail are reported through ``warn`` in one line. Raises ``ValueError`` when
    tags exist but none verifies (resuming would silently start over)."""
    checkpoint_dir = Path(checkpoint_dir)
    skipped = []
    for tag in checkpoint_tags(checkpoint_dir):
        problem = checkpoint_problem(checkpoint_dir / tag)
        if problem is None:
            if skipped:
                warn(f"checkpoint {'; '.join(skipped)} is incomplete/corrupt; using previous good checkpoint "
                     f"{checkpoint_dir / tag}")
            return tag
        skipped.append(f"{checkpoint_dir / tag} ({problem})")
    if skipped:
        raise ValueError(f"--resume: no checkpoint under {checkpoint_dir} verifies: {'; '.join(skipped)}; "
                         f"remove them or start over with --resume none")
    return None


def verified_tag_dir(tag_dir: str | Path) -> tuple[Path, str]:
    """``(checkpoint_dir, tag)`` of an explicitly named tag directory; ``ValueError`` (no fallback:
    the user asked for this one) when it does not verify."""
    tag_dir = Path(tag_dir)
    parse_checkpoint_tag(tag_dir.name)
    problem = checkpoint_problem(tag_dir)
    if problem is not None:
        raise ValueError(f"--resume {tag_dir}: checkpoint is incomplete/corrupt ({problem})")
    return tag_dir.parent, tag_dir.name


def resume_source(resume: str, checkpoint_dir: str | Path, warn: Callable[[str], None]) -> tuple[Path, str] | None:
    """``(checkpoint_dir, tag)`` for ``--resume``: ``none`` (``None``), ``auto`` (the newest
    verified tag in ``checkpoint_dir``, ``None`` if it has none), another checkpoints directory
    (likewise), or a tag directory (must verify)."""
    if resume == "none":
        return None
    directory = Path(checkpoint_dir) if resume == "auto" else Path(resume)
    if resume == "auto" or (directory / "latest").is_file() or checkpoint_tags(directory):
        tag = pick_resume_tag(directory, warn)
        return None if tag is None else (directory, tag)
    if not directory.is_dir():
        raise ValueError(f"--resume {resume}: expected 'auto', 'none', a checkpoints directory or "
                         f"a checkpoint tag directory")
    return verified_tag_dir(directory)


def rotate_checkpoints(checkpoint_dir: str | Path, current: str, keep: int,
                       protected: frozenset[str] = frozenset()) -> list[str]:
    """Delete tags older than the ``keep`` newest verified ones up to and including ``current``
    (which must just have been verified), except ``protected``; returns the deleted tags.

    Unverified tags older than the kept ones go too (they are unusable); tags newer than
    ``current`` are left alone. Older tags were hashed when written, so here only their manifest
    and file sizes are checked (rehashing GBs at every save would cost more than it catches)."""
    checkpoint_dir = Path(checkpoint_dir)
    if keep < 1:
        raise ValueError(f"rotate_checkpoints: keep={keep}; expected >= 1")
    position = _run_order(current)
    older = [tag for tag in checkpoint_tags(checkpoint_dir) if _run_order(tag) <= position]
    kept, deleted = 0, []
    for tag in older:
        if kept < keep and (tag == current or checkpoint_problem(checkpoint_dir / tag, check_hashes=False) is None):
            kept += 1
        elif tag not in protected:
            shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
            deleted.append(tag)
    return deleted
