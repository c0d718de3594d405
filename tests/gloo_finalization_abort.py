"""Minimal reproduction (torch + CPython only, no DeepSpeed, no minillm_rl) of the native abort that
ended 2-rank gloo learners after all their work was done:
``terminate called without an active exception``, SIGABRT.

Run it from the repository root (two local ranks, ~10-20 s)::

    python tests/gloo_finalization_abort.py          # rank 0 aborts (exit -6) after finishing
    python tests/gloo_finalization_abort.py --runs 5  # the same, five times

What happens on rank 0:

1. An async ``all_reduce`` runs on a gloo worker thread (``pt_gloo_runloop``); Python then drops
   the tensor and the work. The tensor's Python object is kept alive by the C++ ``AsyncWork``.
2. The worker drops the finished ``AsyncWork`` only after the collective completes; that
   deallocates the tensor's Python object, so the worker must take the GIL.
3. Here that drop coincides with interpreter shutdown: the main thread holds the GIL through its
   last exit handler, then CPython 3.11 marks the runtime as finalizing. A thread that then waits
   for the GIL is ended with ``pthread_exit``; its forced unwind runs into a ``noexcept``
   destructor (``~AsyncWork`` -> ``~Tensor``) and libstdc++ calls ``std::terminate``.

Backtrace of the aborting thread (core dump, gdb ``bt``)::

    std::terminate() <- __gxx_personality_v0 <- _Unwind_ForcedUnwind <- __pthread_unwind
    <- pthread_exit <- PyThread_exit_thread <- take_gil <- PyEval_RestoreThread
    <- THPVariable_clear <- THPVariable_dealloc <- ConcretePyInterpreterVTable::decref
    <- TensorImpl::decref_pyobject <- ~vector<vector<Tensor>> <- ProcessGroupGloo::AsyncWork::~AsyncWork
    <- AsyncAllreduceWork::~AsyncAllreduceWork <- ProcessGroupGloo::runLoop

In a real learner nothing holds the GIL on purpose: the late drop happens when the worker that ran
one of the last collectives (ZeRO-3 all-gathers, broadcasts, all-reduces whose tensors Python has
already released; a 2-rank ZeRO-3 learner run drops ~100 such works per rank on the gloo workers)
is descheduled until the main thread is finalizing: rare, more frequent on a loaded machine. The
held GIL (step 3) only widens that window so that it is hit on every run. The process groups are
never destroyed before exit (DeepSpeed keeps references; ``destroy_process_group`` only unregisters
them), so their worker threads are alive during finalization whatever the script does.

The workaround, :func:`minillm_rl.runtime.learner.exit_learner_process`, ends learner processes
without interpreter finalization once their work is done.
"""

from __future__ import annotations

import argparse
import atexit
import os
import subprocess
import sys
import time

GIL_HOLD_ITERATIONS = 50_000_000  # sum(range(n)): ~1 s in C holding the GIL, with no eval-breaker check
EXITING_KEY = "rank0_exiting"
JOIN_DELAY_S = 0.3  # rank 1 joins once rank 0 is inside sum()
STORE = []  # rank 0's TCPStore, once created


class ReleasesTheGilWhenFinalized:
    """Freed while the interpreter finalizes, as a learner's state is; releases the GIL there,
    as c10d's Work and process-group objects do when they are destroyed."""

    def __del__(self, sleep=time.sleep) -> None:  # bound now: module globals are gone by then
        sleep(0.2)


freed_during_finalization = ReleasesTheGilWhenFinalized()


def tell_rank1_to_join() -> None:
    STORE[0].set(EXITING_KEY, "1")


def rank_main(rank: int) -> None:
    if rank == 0:
        # Registered before torch registers its own exit handlers, so these two run last (LIFO),
        # right before CPython marks itself finalizing: rank 1 is told to join the all_reduce,
        # then sum() holds the GIL while the gloo worker completes it and frees the tensor.
        atexit.register(sum, range(GIL_HOLD_ITERATIONS))
        atexit.register(tell_rank1_to_join)
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), 2, rank == 0, timedelta(seconds=60))
    STORE.append(store)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    tensor = torch.ones(1 << 16)
    if rank == 0:
        work = dist.all_reduce(tensor, async_op=True)  # runs on a gloo worker until rank 1 joins
        del tensor, work  # from here on only the C++ AsyncWork keeps the tensor (and its Python object)
    else:
        store.wait([EXITING_KEY], timedelta(seconds=60))
        time.sleep(JOIN_DELAY_S)
        dist.all_reduce(tensor)


def launch(runs: int) -> int:
    """Starts ``runs`` times two local ranks of this script; prints how rank 0 ended each time."""
    import socket

    aborted = 0
    for run in range(runs):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        ranks = [subprocess.Popen([sys.executable, __file__, "--rank", str(rank)], env=env, stderr=subprocess.PIPE,
                                  text=True) for rank in (0, 1)]
        results = [(rank.wait(timeout=300), rank.stderr.read()) for rank in ranks]
        code, stderr = results[0]
        terminated = "terminate called without an active exception" in stderr
        aborted += terminated
        print(f"run {run}: rank 0 exit {code}{' (terminate called without an active exception)' if terminated else ''}; "
              f"rank 1 exit {results[1][0]}", flush=True)
    print(f"rank 0 aborted in {aborted} of {runs} runs")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is None:
        sys.exit(launch(args.runs))
    rank_main(args.rank)
