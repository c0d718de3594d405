"""Starting the learner processes when ``minillm-rl train`` was not started by a launcher."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

from minillm_rl.runtime.learner import pick_free_port
from minillm_rl.runtime.preemption import rank_pids, run_forwarding_signals


def relaunch_under_deepspeed(num_learners: int, cli_args: list[str]) -> int:
    """Run this CLI again as ``num_learners`` ranks under the ``deepspeed`` launcher on this
    machine (``DS_ACCELERATOR=cpu`` and one rank per core slot when there is no GPU); returns
    the launcher's exit code (3 when the ranks stopped for preemption: SIGTERM / SIGUSR1 sent to
    this process are forwarded to the ranks, see :func:`~minillm_rl.runtime.preemption.run_forwarding_signals`)."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    script = str(Path(__file__).with_name("__main__.py"))
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_learners),
               "--master_port", str(pick_free_port()), script, *cli_args]
    return run_forwarding_signals(command, env, functools.partial(rank_pids, script=script))
