"""Starting the learner processes when ``minillm-rl train`` was not started by a launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from minillm_rl.learner import _free_port


def relaunch_under_deepspeed(num_learners: int, cli_args: list[str]) -> int:
    """Run this CLI again as ``num_learners`` ranks under the ``deepspeed`` launcher on this
    machine (``DS_ACCELERATOR=cpu`` and one rank per core slot when there is no GPU); returns
    the launcher's exit code."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_learners),
               "--master_port", str(_free_port()), str(Path(__file__).with_name("cli.py")), *cli_args]
    return subprocess.run(command, env=env, check=False).returncode
