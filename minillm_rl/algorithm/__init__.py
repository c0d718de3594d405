"""The paper, as pure tensor code: everything MiniLLM defines, importable without Ray or DeepSpeed.

``sampler`` (teacher-mixed decoding and its records), ``advantages`` (importance weights, rewards,
reward-to-go), ``losses`` and ``chunked_vocab`` (the objectives and their full-vocabulary
kernels), ``ppo`` (one round of updates over an engine), ``supervised`` (SFT / KD), ``logits``,
``forward`` and ``batching`` (shared tensor plumbing), ``engine`` (a one-process engine).
"""
