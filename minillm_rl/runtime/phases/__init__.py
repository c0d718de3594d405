"""The phase loops every learner rank runs (``supervised``: sft, kd, seqkd; ``minillm``).

Each loop resumes from ``run.progress.phase_step`` (the data position is derived from it), calls
:func:`~minillm_rl.runtime.selection.select` at every ``train.eval_interval`` crossing and at the
phase end, checkpoints after each selection, and lets
:func:`~minillm_rl.runtime.resume.maybe_preempt` stop the run.
"""
