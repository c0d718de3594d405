"""minillm_rl: MiniLLM on-policy reverse-KL distillation (Gu et al., ICLR 2024).

The folders are the system diagram:

- ``algorithm/``  the paper as pure tensor code (no Ray, no DeepSpeed): the teacher-mixed sampler,
  advantages, losses and their chunked full-vocabulary kernels, the PPO-style update.
- ``runtime/``    the distributed system: the coordinator and its phases, DeepSpeed learners,
  Ray rollout workers and their client, the replay store, weight sync, checkpoints, preemption.
- ``data/``       instruction data, templates, the PT corpus, ``prepare-data``.
- ``evaluation/`` generation under a protocol, Rouge-L and the distillation metrics, reports.
- ``models.py``   loading, tokenizer checks, student initialisation; ``config.py`` the one typed
  config; ``cli/`` argument parsing, the cluster plan and the re-launch under ``deepspeed``.
"""

__version__ = "0.1.0"
