"""A causal LM that scores a growing batch of responses lazily, and the coins that say when.

Split from :mod:`~minillm_rl.algorithm.sampler` (which owns the records and the decode loop) so
that module stays readable: this one is only "which model runs over which positions, with its KV
cache".

Lazy mixture sampling (algorithm.md §3.2): ``p~ = alpha p + (1 - alpha) q`` is a two-component
mixture, so drawing ``y_t ~ p~`` is drawing a coin ``c_t ~ Bernoulli(alpha)`` independent of every
token, then ``y_t ~ p`` if ``c_t = 1`` else ``y_t ~ q``. Given the coins, a model's distribution is
needed *to sample* only at its own positions; elsewhere only for the records, which one forward
over the positions it has not seen yet gives later. :class:`CachedLM` is that: ``advance(t)``
feeds every token since its previous call in one forward (KV-cached) and returns the logits of
every position it had not scored. One coin per step is shared by the whole batch (per-sequence
coins would need both models at almost every step); each sequence is still exactly a draw from
the mixture, because the coins are independent of the tokens.
"""

from __future__ import annotations

import contextlib

import torch

from minillm_rl.algorithm.teacher_head import HeadRecorder


def mixture_coins(alpha: float, steps: int, generator: torch.Generator | None,
                  device: torch.device | str = "cpu") -> list[bool]:
    """``steps`` shared coins ``c_t ~ Bernoulli(alpha)`` (True: the token at ``t`` is drawn from
    the teacher), drawn from ``generator`` before any token, so they depend on no token and the
    same generator state gives the same coins. ``alpha`` 0 or 1 makes the coins certain and draws
    nothing, leaving the generator's stream to the tokens (the every-step sampler's stream)."""
    if alpha in (0.0, 1.0):
        return [alpha == 1.0] * steps
    uniform = torch.rand(steps, dtype=torch.float64, device=device, generator=generator)
    return (uniform < alpha).tolist()


class CachedLM:
    """One model's forwards over a batch of responses that grow token by token, with its KV cache.

    ``ready`` response positions have been scored (logits predicting ``tokens[:, :ready]``).
    :meth:`advance` ``(to, tokens)`` scores positions ``ready .. to`` in one forward: the first
    call runs the prompt and ``tokens[:, :to]``, later ones only ``tokens[:, ready - 1 : to]``
    (those the cache has not seen). ``calls`` counts the forwards.

    On CPU the LM head of a decode step is a ``[B, H] x [H, V]`` product bound by reading the
    weight; against a transposed contiguous copy of the head it measured 1.5x faster than
    ``F.linear`` (17.5 -> 11.7 ms for a 49k x 576 head at batch 8). So the second call, which runs
    the whole model, also makes that copy, and calls after it run the base model and the copy,
    provided the second call's logits are reproduced from its last hidden states (a model whose
    logits are not a plain linear map of them, e.g. with soft-capping, keeps the whole-model path).
    Not the first call: a model scored once (the teacher at ``alpha = 0``: one forward after
    decoding) would pay for the copy and for that check over every response position, which
    measured 30 % of the teacher's time in a rollout (8 x 128 tokens); at the second call the check
    covers the few positions it scores.

    ``record_hidden`` (the teacher in ``hidden`` mode) also returns the LM head's input behind
    the logits; a model whose logits are not that head's output is refused.

    The KV cache is transformers' ``StaticCache``, preallocated to prompt + response slots: a
    ``DynamicCache`` concatenates every layer's keys and values at every call, copying the whole
    cache each time. Measured (``make bench-decode``, 2 cores, batch 8, 64-token prompts, 128
    steps): a decode step of the 30-layer teacher 113 -> 90 ms, of the 6-layer student 40 -> 35 ms.
    Every call then passes the whole ``attention_mask`` (the cache's width); slots past the
    current position are masked by causality.

    Args:
        model: an HF causal LM.
        prompt_ids: ``[B, P]`` left-padded prompts.
        attention_mask: ``[B, P + N]``: the prompt mask, then ones for the ``N`` response slots
            (positions past a response's end are attended to as well: their outputs are never used).
        prompt_positions: ``[B, P]`` position ids of the prompt tokens.
    """

    def __init__(self, model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_positions: torch.Tensor,
                 record_hidden: bool = False):
        self.model, self.prompt_ids, self.attention_mask = model, prompt_ids, attention_mask
        self.prompt_positions = prompt_positions
        slots = attention_mask.shape[1] - prompt_ids.shape[1]
        # [B, N]: response token j sits at the position after the prompt's last, plus j.
        self.response_positions = prompt_positions[:, -1:] + 1 + torch.arange(slots, device=prompt_ids.device)
        self.recorder = HeadRecorder(model) if record_hidden else None
        self.cache = None
        self.head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.ready = 0
        self.calls = 0

    def advance(self, to: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[B, n, V]`` of response positions ``ready .. to`` (``n = to + 1 - ready``) and,
        with ``record_hidden``, the head's input ``[B, n, d]`` behind them (else ``None``).
        ``tokens``: ``[B, >= to]`` the responses so far."""
        if to < self.ready:
            raise ValueError(f"CachedLM.advance: position {to} was scored already ({self.ready} are)")
        count = to + 1 - self.ready
        inputs = {"attention_mask": self.attention_mask, "use_cache": True}
        self.calls += 1
        if self.cache is None:
            return self._first_call(inputs, to, tokens)
        unseen = slice(self.ready - 1, to)
        inputs.update(input_ids=tokens[:, unseen], position_ids=self.response_positions[:, unseen], cache=self.cache)
        self.ready = to + 1
        if self.head is None:
            derive_head = self.calls == 2 and self.prompt_ids.device.type == "cpu"
            with self.recorder or contextlib.nullcontext():
                out = self.model(**inputs, logits_to_keep=count, output_hidden_states=derive_head)
            if derive_head:
                self.head = _transposed_head(self.model, out.hidden_states[-1][:, -count:], out.logits)
            return out.logits, None if self.recorder is None else self.recorder.hidden_for(out.logits)
        weight_t, bias = self.head
        hidden = self.model.base_model(**inputs).last_hidden_state
        logits = hidden @ weight_t
        return (logits if bias is None else logits.add_(bias)), hidden if self.recorder is not None else None

    def _first_call(self, inputs: dict, to: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Imported here: the replay store unpickles Rollouts (the sampler) and needs no transformers.
        from transformers import StaticCache

        self.cache = StaticCache(config=self.model.config, max_cache_len=self.attention_mask.shape[1])
        inputs.update(input_ids=torch.cat([self.prompt_ids, tokens[:, :to]], dim=1),
                      position_ids=torch.cat([self.prompt_positions, self.response_positions[:, :to]], dim=1),
                      cache=self.cache)
        with self.recorder or contextlib.nullcontext():
            logits = self.model(**inputs, logits_to_keep=to + 1).logits
        self.ready = to + 1
        return logits, None if self.recorder is None else self.recorder.hidden_for(logits)


def _transposed_head(model, hidden: torch.Tensor, logits: torch.Tensor):
    """``(weight^T contiguous [H, V], bias or None)`` of ``model``'s LM head if ``hidden [..., H]``
    times it reproduces ``logits [..., V]``, else ``None``."""
    head = model.get_output_embeddings()
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if weight is None or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        return None
    weight_t = weight.detach().t().contiguous()
    candidate = hidden @ weight_t if bias is None else hidden @ weight_t + bias
    if candidate.shape != logits.shape or not torch.allclose(candidate.float(), logits.float(), rtol=1e-4, atol=1e-4):
        return None
    return weight_t, None if bias is None else bias.detach()
