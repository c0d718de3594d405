"""Exit codes of ``minillm-rl`` and the one error type the runtime raises for a failed run.

Schedulers and wrapper scripts branch on these codes (``launch/`` requeues on
:data:`EXIT_PREEMPTED`), so they are part of the user's contract:

- :data:`EXIT_OK` (0): the run finished.
- :data:`EXIT_FAILED` (1): the run failed at run time (a timeout, a worker that could not be
  restarted, too many non-finite steps in a row); the last good checkpoint is kept and the cause
  is printed as one line.
- :data:`EXIT_BAD_INPUT` (2): bad input (recipe, data, model path, DeepSpeed file), refused before
  anything was written to the output directory.
- :data:`EXIT_PREEMPTED` (3): stopped on request (SIGTERM / SIGUSR1, or
  ``runtime.stop_after_steps``) after writing a checkpoint; run the same command with
  ``--resume auto`` to continue ("requeue me").
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 3


class RunFailed(RuntimeError):
    """The run cannot go on; the message is one line saying why and what was kept."""
