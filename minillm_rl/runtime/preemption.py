"""Preemption by signal: SIGTERM / SIGUSR1 ask the run to checkpoint and exit with code 3.

Schedulers announce preemption with a signal (Slurm: ``scancel --signal=USR1`` or
``--signal=USR1@<seconds>``; Kubernetes and most others: SIGTERM, then SIGKILL after a grace
period). Each learner rank installs :class:`PreemptionSignals`, whose handler only sets a flag;
the run acts on it at the next optimizer-step boundary (an SFT step, or the end of a MiniLLM
round, the unit its data position is counted in), so the time from signal to exit is at most one
step or round plus one checkpoint. Ranks may receive the signal at different times, so at every
boundary they agree with an all-reduce (MAX) of the flag before deciding. Further signals while
the checkpoint is written only set the flag again, so they cannot abort it.

When ``minillm-rl train`` starts its own ranks under the ``deepspeed`` launcher
(:func:`run_forwarding_signals`), the launcher would answer SIGTERM by killing the ranks and
does not handle SIGUSR1 at all; so the launcher runs in its own session, out of reach of
signals sent to our process group, and we forward SIGTERM / SIGUSR1 to the rank processes
ourselves (SIGINT, i.e. Ctrl-C, still goes to the launcher, which stops the ranks at once).

Slurm signals every process of a job step, including the Ray processes a rank starts with
``ray_address: local``; those are started with SIGUSR1 blocked (:func:`children_ignore_sigusr1`)
so that SIGUSR1 reaches only the learners. SIGTERM would still stop them, so on Slurm preempt with
SIGUSR1 (``scancel --signal=USR1``, ``#SBATCH --signal=USR1@<seconds>``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionSignals:
    """Install flag-setting handlers for :data:`PREEMPTION_SIGNALS` (main thread only; elsewhere
    Python cannot install handlers and nothing is installed). Use as a context manager: the
    previous handlers come back on exit.

    Args:
        announce: print one line when a signal arrives (rank 0).
        world_size: number of learner ranks; above 1, :meth:`requested` is a collective.
        timeout_s: bound on that collective (a dead rank surfaces as an error, not a hang).
    """

    def __init__(self, announce: bool, world_size: int = 1, timeout_s: float = 1800.0):
        self.announce, self.world_size, self.timeout_s = announce, world_size, timeout_s
        self.received = 0  # signal number of the last signal received by this rank, 0 = none
        self._previous: dict[int, object] = {}
        self._group = None

    def __enter__(self) -> PreemptionSignals:
        if self.world_size > 1:
            # The flag travels as a CPU tensor: gloo reduces it whatever backend trains (NCCL on GPU).
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        self.install()
        return self

    def install(self) -> None:
        """(Re)install the handlers; call again after a library replaced one (``ray.init``
        installs a SIGTERM handler that aborts the process)."""
        if threading.current_thread() is threading.main_thread():
            for signum in PREEMPTION_SIGNALS:
                previous = signal.signal(signum, self._handle)
                self._previous.setdefault(signum, previous)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        if self.announce:
            # os.write, not print: a handler that interrupts a print to the same stream would raise.
            os.write(2, f"minillm-rl: {signal.Signals(signum).name} received; checkpointing at the next step "
                        f"boundary\n".encode())

    def requested(self) -> str | None:
        """Name of the signal any rank received (``None``: keep going). Collective when
        ``world_size > 1``: every rank calls it at the same step boundaries."""
        received = self.received
        if self.world_size > 1:
            flag = torch.tensor([received], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            received = int(flag.item())
        return signal.Signals(received).name if received else None


@contextlib.contextmanager
def children_ignore_sigusr1() -> Iterator[None]:
    """Block SIGUSR1 in this thread while processes are started inside (e.g. a local Ray's gcs,
    raylet and workers): they inherit the blocked mask and never see it. A SIGUSR1 for this
    process meanwhile is not lost: another thread takes it, or it waits for the unblock."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


def rank_pids(launcher_pid: int, script: str) -> list[int]:
    """PIDs of the processes under ``launcher_pid`` that run ``script`` with ``--local_rank``
    (the ranks the ``deepspeed`` launcher started; not their Ray or compiler children)."""
    import psutil

    pids = []
    try:
        descendants = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for process in descendants:
        try:
            command = process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if script in command and any(arg.startswith("--local_rank") for arg in command):
            pids.append(process.pid)
    return pids


# Runs the launcher as the leader of its own session and stops that whole session when its parent
# (the CLI) dies: the session shields the launcher from signals sent to our process group, so
# without this a SIGKILLed ``minillm-rl`` would leave the launcher and the ranks running.
# PR_SET_PDEATHSIG (1) delivers SIGTERM on the parent's death; the parent pid check covers a
# death before prctl ran. Plain Python without imports of ours: it starts in milliseconds.
_SESSION_GUARD = """
import ctypes, os, signal, subprocess, sys
def stop(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, lambda signum, frame: None)  # a handler, not SIG_IGN: exec resets it
ctypes.CDLL(None).prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):
    stop(signal.SIGTERM, None)
sys.exit(subprocess.call(sys.argv[2:]))
"""


def run_forwarding_signals(command: Sequence[str], env: dict[str, str],
                           find_ranks: Callable[[int], list[int]], poll_s: float = 0.5) -> int:
    """Run ``command`` (a launcher) in its own session and return its exit code; SIGTERM /
    SIGUSR1 received meanwhile are sent to ``find_ranks(launcher_pid)`` (a signal that arrives
    before the ranks exist is delivered once they do), SIGINT to the launcher's session."""
    pending: list[int] = []
    launcher = subprocess.Popen([sys.executable, "-c", _SESSION_GUARD, str(os.getpid()), *command], env=env,
                                start_new_session=True)

    def forward_later(signum: int, frame) -> None:
        pending.append(signum)

    def interrupt(signum: int, frame) -> None:
        os.killpg(launcher.pid, signal.SIGINT)

    previous = {signum: signal.signal(signum, forward_later) for signum in PREEMPTION_SIGNALS}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    try:
        while True:
            try:
                return launcher.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                pass
            if pending and (ranks := find_ranks(launcher.pid)):
                for signum in pending:
                    for pid in ranks:
                        try:
                            os.kill(pid, signum)
                        except ProcessLookupError:
                            pass
                pending.clear()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
