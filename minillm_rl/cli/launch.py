"""Starting the learner processes when ``minillm-rl train`` was not started by a launcher."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

from minillm_rl.errors import EXIT_OK, EXIT_PREEMPTED, RunFailed
from minillm_rl.runtime.failure import FAILURE_DIR_ENV, failure_line, first_failure, new_failure_dir
from minillm_rl.runtime.learner import pick_free_port
from minillm_rl.runtime.preemption import rank_pids, run_forwarding_signals


def relaunch_under_deepspeed(num_learners: int, cli_args: list[str], output_dir: str) -> int:
    """Run this CLI again as ``num_learners`` ranks under the ``deepspeed`` launcher on this
    machine (``DS_ACCELERATOR=cpu`` and one rank per core slot when there is no GPU); returns
    the launcher's exit code (3 when the ranks stopped for preemption: SIGTERM / SIGUSR1 sent to
    this process are forwarded to the ranks, see :func:`~minillm_rl.runtime.preemption.run_forwarding_signals`).

    A failed run raises one :class:`~minillm_rl.errors.RunFailed` line for the first rank that
    failed (:mod:`minillm_rl.runtime.failure`); the ranks themselves print no traceback."""
    failure_dir = new_failure_dir()
    env = dict(os.environ, **{FAILURE_DIR_ENV: str(failure_dir)})
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    script = str(Path(__file__).with_name("__main__.py"))
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_learners),
               "--master_port", str(pick_free_port()), script, *cli_args]
    code = run_forwarding_signals(command, env, functools.partial(rank_pids, script=script))
    line = first_failure(failure_dir, output_dir)
    if line is None and code not in (EXIT_OK, EXIT_PREEMPTED):
        line = failure_line({"what": f"a learner rank exited with code {code} without a report (killed, or the "
                                     "launcher failed: see its output above)"}, output_dir, "none")
    if line is not None:
        raise RunFailed(line)
    return code
