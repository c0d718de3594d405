"""Preemption by signal (minillm_rl/runtime/preemption.py): the flag-setting handlers, and SIGTERM /
SIGUSR1 reaching the ranks through the real ``deepspeed`` launcher with exit code 3 coming back.
The end-to-end signal -> checkpoint -> resume test is in tests/test_train_e2e.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minillm_rl.runtime.learner import pick_free_port
from minillm_rl.runtime.preemption import PreemptionSignals, children_ignore_sigusr1

REPO = Path(__file__).resolve().parents[1]
EXIT_PREEMPTED = 3

# A stand-in for a learner rank: records the first preemption signal it gets, then exits 3.
FAKE_RANK = """
import os, pathlib, signal, sys, time
out, rank, got = pathlib.Path(sys.argv[-1]), os.environ["RANK"], []
for signum in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(signum, lambda s, f: got.append(s))
(out / f"ready{rank}").write_text(str(os.getpid()))
deadline = time.monotonic() + 120
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
(out / f"got{rank}").write_text(signal.Signals(got[0]).name if got else "nothing")
sys.exit(3 if got else 1)
"""

# `minillm-rl train` with num_learners=2, minus the training: the deepspeed launcher over FAKE_RANK.
FORWARDER = """
import functools, os, sys
from minillm_rl.runtime.preemption import rank_pids, run_forwarding_signals
script, port, out = sys.argv[1:]
command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port, script, out]
sys.exit(run_forwarding_signals(command, dict(os.environ), functools.partial(rank_pids, script=script)))
"""


def test_signals_only_set_a_flag_and_handlers_are_restored():
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    with PreemptionSignals(announce=False) as preemption:
        assert preemption.requested() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested() == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal (e.g. while checkpointing) is harmless
        assert preemption.requested() == "SIGTERM"
    assert {signum: signal.getsignal(signum) for signum in previous} == previous


def test_children_started_under_the_block_ignore_sigusr1_and_ours_arrives_late():
    """Ray's processes (started by rank 0) must survive a SIGUSR1 sent to the whole Slurm step;
    a SIGUSR1 for this process during the block must not be lost."""
    with PreemptionSignals(announce=False) as preemption:
        with children_ignore_sigusr1():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            os.kill(os.getpid(), signal.SIGUSR1)  # another thread takes it, or it waits for the unblock
        assert preemption.requested() == "SIGUSR1"
        try:
            os.kill(child.pid, signal.SIGUSR1)  # its default action would terminate it: it must stay pending
            status = dict(line.split(":\t") for line in Path(f"/proc/{child.pid}/status").read_text().splitlines()
                          if ":\t" in line)
            bit = 1 << (signal.SIGUSR1 - 1)
            assert int(status["SigBlk"], 16) & bit and int(status["ShdPnd"], 16) & bit
            assert child.poll() is None
        finally:
            child.kill()
            child.wait()


def _start_forwarder(tmp_path: Path, **popen_kwargs) -> subprocess.Popen:
    """FORWARDER over two FAKE_RANKs in ``tmp_path``, with no launcher variables inherited."""
    script = tmp_path / "fake_rank.py"
    script.write_text(FAKE_RANK)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-c", FORWARDER, str(script), str(pick_free_port()), str(tmp_path)],
                            env=env, cwd=REPO, **popen_kwargs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_to_the_cli_reaches_every_rank_under_the_deepspeed_launcher(tmp_path, signum):
    """Sent to the process that started the launcher, the signal must reach both ranks (the
    launcher alone would kill them on SIGTERM and die on SIGUSR1) and their exit code 3 come back."""
    forwarder = _start_forwarder(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180  # a hang guard, not a timing assertion
        while not all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)):
            assert forwarder.poll() is None and time.monotonic() < deadline, forwarder.communicate()[0][-3000:]
            time.sleep(0.1)
        os.kill(forwarder.pid, signum)
        output, _ = forwarder.communicate(timeout=120)
    finally:
        if forwarder.poll() is None:
            forwarder.kill()
    assert forwarder.returncode == EXIT_PREEMPTED, output[-3000:]
    name = signal.Signals(signum).name
    assert [(tmp_path / f"got{rank}").read_text() for rank in (0, 1)] == [name, name]


def test_ranks_do_not_outlive_a_killed_cli(tmp_path):
    """SIGKILL to the process that started the launcher (which runs in its own session) must still
    stop the launcher and the ranks: no learner is left running after the CLI is gone."""
    forwarder = _start_forwarder(tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180  # hang guards, not timing assertions
    while not all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)):
        assert forwarder.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.2)  # the ready file is written before its pid text is flushed on some filesystems
    rank_pids = [int((tmp_path / f"ready{rank}").read_text()) for rank in (0, 1)]
    forwarder.kill()
    forwarder.wait()
    deadline = time.monotonic() + 60
    alive = rank_pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in rank_pids if Path(f"/proc/{pid}").exists()
                 and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[:1]]
        time.sleep(0.2)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"ranks {alive} outlived the killed CLI"
