"""Checkpoint integrity without DeepSpeed: manifests, verification, the resume choice, rotation
(minillm_rl/runtime/checkpointing.py). Checkpoints here are tag directories of small fake files laid
out like DeepSpeed's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minillm_rl.runtime.checkpointing import (
    MANIFEST_NAME,
    best_rouge_tag,
    checkpoint_problem,
    checkpoint_tag,
    checkpoint_tags,
    pick_resume_tag,
    read_manifest_summary,
    resume_source,
    rotate_checkpoints,
    write_manifest,
)

MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _save(checkpoint_dir: Path, phase_index: int, step: int, manifest: bool = True) -> Path:
    """A fake DeepSpeed tag with a model file, an optimizer file in a sub-directory and ``latest``."""
    tag = checkpoint_tag(phase_index, ["sft", "minillm"][phase_index], step)
    tag_dir = checkpoint_dir / tag
    (tag_dir / "zero").mkdir(parents=True)
    (tag_dir / MODEL_FILE).write_bytes(bytes(range(256)) * 4 + tag.encode())
    (tag_dir / "zero" / OPTIM_FILE).write_bytes(b"adam moments " * 50 + tag.encode())
    (checkpoint_dir / "latest").write_text(tag)  # DeepSpeed writes it before our manifest
    if manifest:
        write_manifest(tag_dir, {"progress": {"phase_step": step}})
    return tag_dir


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _warnings_while_picking(checkpoint_dir: Path) -> tuple[str | None, list[str]]:
    lines: list[str] = []
    return pick_resume_tag(checkpoint_dir, lines.append), lines


def test_manifest_lists_every_file_and_verifies(tmp_path):
    tag_dir = _save(tmp_path, 0, 3)
    manifest = json.loads((tag_dir / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == [MODEL_FILE, f"zero/{OPTIM_FILE}"]
    assert manifest["files"][MODEL_FILE]["size"] == (tag_dir / MODEL_FILE).stat().st_size
    assert checkpoint_problem(tag_dir) is None
    assert read_manifest_summary(tag_dir) == {"progress": {"phase_step": 3}}
    assert not [p for p in tag_dir.iterdir() if p.name.endswith(".tmp")]  # the atomic write cleaned up


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / MODEL_FILE).write_bytes((d / MODEL_FILE).read_bytes()[:-7]), f"file {MODEL_FILE}: size"),
    (lambda d: _flip_byte(d / "zero" / OPTIM_FILE), f"file zero/{OPTIM_FILE}: sha256 mismatch"),
    (lambda d: (d / MODEL_FILE).unlink(), f"file {MODEL_FILE}: missing"),
    (lambda d: (d / MANIFEST_NAME).unlink(), f"no {MANIFEST_NAME}: the save did not finish"),
    (lambda d: (d / MANIFEST_NAME).write_text('{"files": {"a": '), f"unreadable {MANIFEST_NAME}"),
], ids=["truncated", "flipped-byte", "missing-file", "missing-manifest", "broken-manifest"])
def test_damaged_newest_checkpoint_is_detected_and_the_previous_good_one_used(tmp_path, damage, expected):
    good = _save(tmp_path, 0, 3)
    newest = _save(tmp_path, 1, 2)
    damage(newest)
    assert expected in checkpoint_problem(newest)
    tag, warnings = _warnings_while_picking(tmp_path)
    assert tag == good.name
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert str(newest) in warnings[0] and expected in warnings[0] and f"previous good checkpoint {good}" in warnings[0]


def test_flipped_byte_is_caught_by_the_hash_even_though_the_size_is_unchanged(tmp_path):
    tag_dir = _save(tmp_path, 0, 3)
    _flip_byte(tag_dir / MODEL_FILE)
    assert checkpoint_problem(tag_dir, check_hashes=False) is None
    assert "sha256 mismatch" in checkpoint_problem(tag_dir)


def test_newest_is_picked_by_run_order_not_by_name_or_latest(tmp_path):
    _save(tmp_path, 1, 2)
    _save(tmp_path, 0, 6)  # later on disk, earlier in the run: "latest" now names it
    assert checkpoint_tags(tmp_path) == [checkpoint_tag(1, "minillm", 2), checkpoint_tag(0, "sft", 6)]
    assert _warnings_while_picking(tmp_path) == (checkpoint_tag(1, "minillm", 2), [])


def test_no_checkpoint_is_a_fresh_start_but_only_broken_ones_is_an_error(tmp_path):
    assert _warnings_while_picking(tmp_path / "absent") == (None, [])
    (tmp_path / "best").mkdir()  # non-tag directories are not checkpoints
    assert _warnings_while_picking(tmp_path) == (None, [])
    _save(tmp_path, 0, 3, manifest=False)
    with pytest.raises(ValueError, match=r"no checkpoint under .* verifies: .*phase0-sft-step00000003 \(no manifest"):
        pick_resume_tag(tmp_path, print)


def test_resume_source_auto_directory_and_explicit_tag(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    good = _save(checkpoints, 0, 3)
    bad = _save(checkpoints, 0, 6)
    _flip_byte(bad / MODEL_FILE)
    warnings: list[str] = []
    assert resume_source("none", checkpoints, warnings.append) is None
    assert resume_source("auto", checkpoints, warnings.append) == (checkpoints, good.name)
    assert resume_source(str(checkpoints), tmp_path / "elsewhere", warnings.append) == (checkpoints, good.name)
    assert len(warnings) == 2
    assert resume_source(str(good), tmp_path / "elsewhere", warnings.append) == (checkpoints, good.name)
    # An explicitly named checkpoint that fails is an error: no silent fallback.
    with pytest.raises(ValueError, match=r"checkpoint is incomplete/corrupt \(file mp_rank_00_model_states.pt: sha256"):
        resume_source(str(bad), checkpoints, warnings.append)
    with pytest.raises(ValueError, match="expected 'auto', 'none', a checkpoints directory"):
        resume_source(str(tmp_path / "nowhere"), checkpoints, warnings.append)


def test_rotation_keeps_the_newest_verified_and_the_protected(tmp_path):
    tags = [_save(tmp_path, 0, step).name for step in (1, 2, 3)]
    (tmp_path / tags[2] / MANIFEST_NAME).unlink()  # step 3 is incomplete
    current = _save(tmp_path, 1, 1).name
    (tmp_path / "not-a-tag").mkdir()
    deleted = rotate_checkpoints(tmp_path, current, keep=2, protected=frozenset([tags[0]]))
    # Kept: the one just written and the newest verified before it (step 2, not the broken step 3);
    # step 1 is protected (best Rouge-L); the broken step 3 is garbage.
    assert deleted == [tags[2]]
    assert checkpoint_tags(tmp_path) == [current, tags[1], tags[0]]
    assert (tmp_path / "not-a-tag").is_dir() and (tmp_path / "latest").is_file()


def test_rotation_never_deletes_the_resume_source_before_a_newer_one_verified(tmp_path):
    resumed_from = _save(tmp_path, 0, 3).name
    newer_broken = _save(tmp_path, 0, 6, manifest=False).name  # a save that crashed
    current = _save(tmp_path, 0, 4).name  # the resumed run's first save
    assert rotate_checkpoints(tmp_path, current, keep=1) == [resumed_from]
    # keep=1: only once `current` verified did the resume source go; the newer (abandoned) tag
    # is left for the run to overwrite when it gets there.
    assert checkpoint_tags(tmp_path) == [newer_broken, current]
    assert rotate_checkpoints(tmp_path, current, keep=3) == []


def test_best_rouge_tag_is_the_final_phases_best_step_once_in_that_phase():
    phases, best = ["sft", "minillm"], {"sft": {"step": 3}, "minillm": {"step": 4}}
    assert best_rouge_tag(phases, 1, best) == {checkpoint_tag(1, "minillm", 4)}
    assert best_rouge_tag(phases, 0, best) == frozenset()  # the SFT phase's best is sft_best_loss/, not rotated
    assert best_rouge_tag(phases, 1, {"sft": {"step": 3}}) == frozenset()
