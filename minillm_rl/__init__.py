"""minillm_rl: MiniLLM on-policy reverse-KL distillation (Gu et al., ICLR 2024).

Pure math lives in small modules over tensors (``logits``, ``chunked_vocab``, ``losses``,
``advantages``, ``rollout.sampler``); distributed glue (Ray actors, DeepSpeed learners,
coordinator) is kept thin on top of them.
"""

__version__ = "0.1.0"
