"""A failure on one learner rank reads as one line (``minillm_rl.runtime.failure``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from tiny_assets import write_assets

from minillm_rl.errors import RunFailed
from minillm_rl.runtime.failure import FAILURE_DIR_ENV, RankFailed, first_failure, rank_failures

REPO = Path(__file__).resolve().parents[1]


def _fail_in_a_phase():
    raise OSError(28, "No space left on device")


def test_the_first_rank_failure_is_the_line_and_the_tracebacks_go_to_the_run_logs(tmp_path, monkeypatch):
    failure_dir, out = tmp_path / "failures", tmp_path / "run"
    failure_dir.mkdir()
    monkeypatch.setenv(FAILURE_DIR_ENV, str(failure_dir))
    with pytest.raises(RankFailed) as first:
        with rank_failures(out, rank=1):
            _fail_in_a_phase()
    assert first.value.reported_elsewhere  # the rank itself prints nothing
    time.sleep(0.01)
    with pytest.raises(RankFailed):
        with rank_failures(out, rank=0):
            raise RuntimeError("Connection closed by peer")  # a consequence, recorded later
    with pytest.raises(ValueError):  # bad input keeps its own one-line report
        with rank_failures(out, rank=0):
            raise ValueError("data.train: not found")

    line = first_failure(failure_dir, out)
    assert line.startswith("rank 1: OSError: [Errno 28] No space left on device (test_failure.py:")
    assert "in _fail_in_a_phase)" in line and "last good checkpoint: none" in line
    assert "1 other rank(s) failed after it" in line and "\n" not in line
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["rank0.traceback", "rank1.traceback"]
    assert "Connection closed by peer" in (out / "logs" / "rank0.traceback").read_text()
    assert not failure_dir.exists()


def test_a_failed_torch_save_says_it_may_be_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.delenv(FAILURE_DIR_ENV, raising=False)
    with pytest.raises(RunFailed) as failed:
        with rank_failures(tmp_path / "run", rank=1):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")
    assert f"torch could not write a file under {tmp_path / 'run'} (" in str(failed.value)
    assert "bytes free there: a full disk?); last good checkpoint: none" in str(failed.value)
    with pytest.raises(RunFailed) as other:  # any other error: no hint
        with rank_failures(tmp_path / "run", rank=1):
            raise RuntimeError("Connection closed by peer")
    assert "full disk" not in str(other.value)


def test_without_a_launching_process_the_rank_reports_its_own_line(tmp_path, monkeypatch):
    monkeypatch.delenv(FAILURE_DIR_ENV, raising=False)
    with pytest.raises(RunFailed) as failed:
        with rank_failures(tmp_path / "run", rank=3):
            _fail_in_a_phase()
    assert not getattr(failed.value, "reported_elsewhere", False)
    assert str(failed.value).startswith("rank 3: OSError: [Errno 28]")
    assert f"tracebacks: {tmp_path / 'run' / 'logs' / 'rank3.traceback'}" in str(failed.value)


@pytest.fixture
def full_disk(tmp_path):
    """A 160 KB tmpfs: room for the run's first files, not for its first checkpoint."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI runs as root)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_on_one_of_two_ranks_reads_as_one_failure_line(full_disk, tmp_path, shared_ray):
    assets = write_assets(tmp_path / "assets")
    out = full_disk / "run"
    args = ["minillm-rl", "train", "--config", "launch/recipes/tiny-e2e.yaml", f"model.teacher={assets['teacher']}",
            f"model.student={assets['student']}", f"data.train={assets['data']}", f"output.dir={out}",
            f"runtime.ray_address={shared_ray['address']}", "runtime.num_rollout_workers=1"]
    env = {**os.environ, **shared_ray["env"], "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("minillm-rl:")]
    assert len(ours) == 1, output[-4000:]
    # Either rank may hit the full disk first: rank 0 writing the model (an OSError), or rank 1 its
    # optimizer shard through torch.save, whose zip writer has no errno (the line says what it means).
    first = re.match(r"minillm-rl: run failed: rank (\d): ", ours[0])
    assert first, ours
    assert ("OSError: [Errno 28] No space left on device" in ours[0]
            or f"torch could not write a file under {out} (" in ours[0] and "a full disk?)" in ours[0]), ours
    assert "last good checkpoint: none" in ours[0] and "tracebacks: " in ours[0]
    # Neither the failing rank's traceback nor the other rank's consequential gloo error reaches the user.
    assert "Traceback" not in output and "Connection closed" not in output
    kept = Path(ours[0].split("tracebacks: ")[1].split(" ")[0]).parent
    assert f"rank{first.group(1)}.traceback" in {p.name for p in kept.glob("rank*.traceback")}
    failed_first = (kept / f"rank{first.group(1)}.traceback").read_text()
    assert "No space left on device" in failed_first or "inline_container.cc" in failed_first
    subprocess.run(["rm", "-rf", str(kept)], check=False)
