"""``python -m minillm_rl.cli``, the ``minillm-rl`` console script, and the script the ``deepspeed``
launcher runs once per learner rank."""

from __future__ import annotations

import sys
from typing import NoReturn

from minillm_rl.cli import main


def run() -> NoReturn:
    """Run the CLI, then end the process with its exit code.

    A process that joined a torch.distributed process group (every learner rank of ``minillm-rl
    train``, a world of one included) ends through
    :func:`~minillm_rl.runtime.learner.exit_learner_process`, also after an unexpected exception
    (printed as Python would): a normal interpreter shutdown can abort natively there while the
    gloo worker threads are alive. Other commands exit as usual.
    """
    try:
        code = main()
    except Exception:
        if not _joined_process_group():
            raise
        sys.excepthook(*sys.exc_info())
        code = 1
    if _joined_process_group():
        from minillm_rl.runtime.learner import exit_learner_process

        exit_learner_process(code)
    sys.exit(code)


def _joined_process_group() -> bool:
    distributed = sys.modules.get("torch.distributed")  # not imported: no process group to ask about
    return distributed is not None and distributed.is_available() and distributed.is_initialized()


if __name__ == "__main__":
    run()
