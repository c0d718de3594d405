"""A single-process engine with the slice of DeepSpeed's engine API the loops use.

``deepspeed.initialize`` returns an engine whose ``backward(loss)`` and ``step()`` own gradient
clipping, the optimizer and the LR schedule. ``TorchEngine`` does the same for one process, so the
SFT and MiniLLM loops are written once and run unchanged under DeepSpeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    """AdamW + schedule. Defaults: the MiniLLM phase of the reference OPT-13B → 1.3B run."""

    lr: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "constant"  # "constant" after warm-up (MiniLLM) or "cosine" (SFT)
    total_steps: int = 5000
    grad_clip: float = 1.0


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warm-up, then
    constant or cosine decay to 0 at ``total_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"OptimConfig.schedule={cfg.schedule!r}; expected 'constant' or 'cosine'")


class TorchEngine:
    """``model`` + AdamW + LR schedule + gradient clipping behind ``backward`` / ``step``."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig):
        self.module = model
        self.cfg = cfg
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.global_steps = 0
        self.skipped_steps = 0
        self._last_grad_norm = 0.0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        """Clip, step, advance the schedule. A non-finite gradient skips the update (as
        DeepSpeed's loss scaler does) and is counted."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip).item()
        self._last_grad_norm = grad_norm
        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
            self.global_steps += 1
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float:
        """Pre-clip gradient norm of the last ``step`` (DeepSpeed's name)."""
        return self._last_grad_norm

    def get_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()
