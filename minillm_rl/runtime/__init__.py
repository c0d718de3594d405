"""The distributed system around :mod:`minillm_rl.algorithm`.

``coordinator`` runs a recipe's phases on every learner rank (``phases/``); ``run`` holds the
state they share; ``learner`` builds the DeepSpeed engines; ``rollout/`` holds the Ray rollout
worker and rank 0's client; ``replay`` the replay store; ``weights`` the weight payloads;
``checkpointing`` and ``preemption`` make runs resumable and stoppable.
"""
