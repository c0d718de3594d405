"""Faults on demand for tests/test_faults.py, importable inside Ray actors (the tests put this
directory on the actors' PYTHONPATH): a student whose forward is slow, or its loading, and a replay store that
SIGKILLs a process (itself or a worker) at a chosen call, once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from tiny_assets import tiny_llama
from transformers import LlamaForCausalLM

from minillm_rl.runtime.replay import ReplayBuffer


class SlowLlama(LlamaForCausalLM):
    """A Llama whose every forward first sleeps ``delay_s`` (a worker that is busy, or stuck)."""

    delay_s = 0.0

    def forward(self, *args: Any, **kwargs: Any):
        time.sleep(self.delay_s)
        return super().forward(*args, **kwargs)


def slow_llama(vocab_size: int, delay_s: float) -> SlowLlama:
    """A one-layer :class:`SlowLlama` with the architecture of ``tiny_assets.tiny_llama``."""
    model = SlowLlama(tiny_llama(vocab_size, 1, 1, 0.1).config).float().eval()
    model.delay_s = delay_s
    return model


def slow_to_load(delay_s: float, load: Callable[[], Any]) -> Any:
    """``load()`` after sleeping ``delay_s``: a model that is slow to load (a worker slow to start)."""
    time.sleep(delay_s)
    return load()


class KillingStore(ReplayBuffer):
    """A replay store that, once armed, SIGKILLs ``pid`` (default: its own process) at the first
    ``take``, or right after storing the put with key ``key``. Arming is a method call, not a
    constructor argument, so the store Ray restarts after killing itself is unarmed."""

    _trap: tuple[str, Any, int] | None = None

    def arm(self, method: str, key: Any = None, pid: int | None = None) -> None:
        self._trap = (method, key, os.getpid() if pid is None else pid)

    def _spring(self, method: str, key: Any) -> None:
        if self._trap is not None and self._trap[:2] == (method, key):
            pid, self._trap = self._trap[2], None
            os.kill(pid, signal.SIGKILL)

    def put(self, payload: Any, policy_version: int, num_samples: int | None = None, key: Any = None) -> bool:
        stored = super().put(payload, policy_version, num_samples, key)
        self._spring("put", key)
        return stored

    def take(self, num_samples: int, min_policy_version: int = 0):
        self._spring("take", None)
        return super().take(num_samples, min_policy_version)
