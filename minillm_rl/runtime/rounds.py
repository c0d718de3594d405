"""Data order and round assembly: pure functions every learner rank computes identically.

The data position of a run is its step counter: SFT batch ``s`` and MiniLLM round ``r`` are
recomputed from seeded permutations (:func:`epoch_order`, :func:`round_prompt_indices`), so ranks
agree without talking and a checkpoint needs no data-loader state. Rollout shards arrive in a
nondeterministic order; :func:`canonical_order` and :func:`concat_rollouts` turn them into the
same round on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
import torch.nn.functional as F

from minillm_rl.runtime.replay import ReplayItem
from minillm_rl.algorithm.sampler import Rollout

# Rollout fields padded on the left (prompts) and the ids padded with the pad token, not 0.
_LEFT_PADDED = ("prompt_ids", "prompt_mask")
_TOKEN_FIELDS = ("prompt_ids", "response_ids")


def derived_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from ``seed`` and labels (e.g. ``("rollout", round, shard)``), stable across
    processes and Python versions (unlike ``hash``)."""
    text = "/".join(str(part) for part in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


def epoch_order(seed: int, stream: str, epoch: int, size: int) -> list[int]:
    """The seeded permutation of ``range(size)`` used for ``epoch`` of data ``stream``."""
    generator = torch.Generator().manual_seed(derived_seed(seed, stream, epoch))
    return torch.randperm(size, generator=generator).tolist()


def permuted_chunk(seed: int, stream: str, chunk_index: int, chunk_size: int, size: int) -> list[int]:
    """Positions ``c*n .. (c+1)*n - 1`` (``n = chunk_size``) of the concatenated per-epoch
    permutations of ``range(size)`` of data ``stream``; a chunk may straddle two epochs."""
    indices, orders = [], {}
    for position in range(chunk_index * chunk_size, (chunk_index + 1) * chunk_size):
        epoch, offset = divmod(position, size)
        if epoch not in orders:
            orders[epoch] = epoch_order(seed, stream, epoch, size)
        indices.append(orders[epoch][offset])
    return indices


def round_prompt_indices(seed: int, round_index: int, num_rollouts: int, num_prompts: int) -> list[int]:
    """Prompt indices of MiniLLM round ``round_index``."""
    return permuted_chunk(seed, "prompts", round_index, num_rollouts, num_prompts)


def split_evenly(items: list, parts: int) -> list[list]:
    """``parts`` contiguous chunks whose sizes differ by at most one (empty chunks dropped)."""
    base, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for part in range(parts):
        size = base + (part < extra)
        chunks.append(items[start : start + size])
        start += size
    return [chunk for chunk in chunks if chunk]


def canonical_order(items: list[ReplayItem]) -> list[ReplayItem]:
    """Replay items sorted by (version, prompt ids, response ids). Identical keys mean identical
    rollouts (same weights, same tokens), so the order no longer depends on arrival order."""
    def key(item: ReplayItem):
        rollout = item.payload
        return (item.policy_version, tuple(rollout.prompt_ids.shape), rollout.prompt_ids.flatten().tolist(),
                tuple(rollout.response_ids.shape), rollout.response_ids.flatten().tolist())
    return sorted(items, key=key)


def check_one_policy_version(item: ReplayItem) -> None:
    """Every token of the item's rollout was drawn with the student weights of the version it is
    stored under (``Rollout.token_policy_versions``): a weight sync never lands inside a
    generation (workers load weights between calls), and this makes that a checked fact.

    Raises:
        RuntimeError: the rollout mixes versions, or its tokens' version is not the item's.
    """
    rollout = item.payload
    if rollout.token_policy_versions is None:
        return
    used = sorted(set(rollout.token_policy_versions[rollout.response_mask.bool()].tolist()))
    if used and used != [item.policy_version]:
        raise RuntimeError(f"replay item {item.key}: its tokens were drawn with student weight versions {used}, "
                           f"stored as version {item.policy_version}: a weight sync reached a generation")


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout of all rows: prompts re-left-padded to the widest ``P``, per-token fields
    right-padded to the widest ``T`` (ids with ``pad_token_id``, everything else with 0).
    ``policy_version`` is the oldest one."""
    if len({r.alpha for r in rollouts}) != 1:
        raise ValueError(f"concat_rollouts: rollouts sampled with different alpha {[r.alpha for r in rollouts]}")
    merged = {}
    for f in dataclasses.fields(Rollout):
        values = [getattr(r, f.name) for r in rollouts]
        if f.name in ("alpha", "policy_version"):
            continue
        if any(v is None for v in values):
            if not all(v is None for v in values):
                raise ValueError(f"concat_rollouts: field {f.name} is set in some rollouts and None in others")
            merged[f.name] = None
            continue
        width = max(v.shape[1] for v in values)
        fill = pad_token_id if f.name in _TOKEN_FIELDS else 0
        padded = []
        for value in values:
            missing = width - value.shape[1]
            # F.pad lists (left, right) pairs from the last dim backwards; dim 1 is the time axis.
            spec = [0, 0] * (value.dim() - 2) + ([missing, 0] if f.name in _LEFT_PADDED else [0, missing])
            padded.append(F.pad(value, spec, value=fill))
        merged[f.name] = torch.cat(padded, dim=0)
    return Rollout(**merged, alpha=rollouts[0].alpha, policy_version=min(r.policy_version for r in rollouts))


def crossed_interval(previous_step: int, step: int, interval: int) -> bool:
    """Whether a multiple of ``interval`` lies in ``(previous_step, step]``."""
    return step // interval > previous_step // interval


def mean_stats(history: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean of numeric per-step stats."""
    keys = [k for k, v in history[0].items() if isinstance(v, (int, float))]
    return {key: sum(h[key] for h in history) / len(history) for key in keys}
