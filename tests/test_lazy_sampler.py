"""Lazy mixture sampling: how often each model runs, and that a generator state replays a rollout.

The distribution and the records of lazy rollouts are checked in test_sampler.py (chi-square
against exact enumeration, teacher-forced recomputation) beside those of every-step mixing.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from test_sampler import EOS, MAX_NEW, PAD, _ragged_prompts, _teacher_student

from minillm_rl.algorithm.cached_lm import mixture_coins
from minillm_rl.algorithm.sampler import SamplingConfig, sample_rollouts


def _lazy(student, teacher, alpha, seed, max_new=MAX_NEW, stop_at_eos=True, generator=None):
    prompt_ids, prompt_mask = _ragged_prompts(seed=1)
    cfg = SamplingConfig(alpha=alpha, max_new_tokens=max_new, teacher_dist="exact", stop_at_eos=stop_at_eos)
    calls, timings = {}, {}
    rollout = sample_rollouts(student, teacher, prompt_ids, prompt_mask, cfg, EOS, PAD,
                              generator=generator or torch.Generator().manual_seed(seed),
                              forward_calls=calls, timings=timings)
    return rollout, calls, timings


@pytest.mark.parametrize("alpha", [0.3, 0.7])
def test_each_model_runs_once_per_position_drawn_from_it_plus_one_catch_up(alpha):
    """Teacher forwards = teacher-drawn positions + 1 catch-up after the last token (none when the
    last token was itself teacher-drawn: every position is scored then); the same for the
    student with the coins flipped. The coins are the first draws of the generator."""
    teacher, student = _teacher_student("llama")
    seen_catch_up = {True: 0, False: 0}
    for seed in range(40):
        if min(seen_catch_up.values()) >= 2:
            break
        for stop_at_eos in (True, False):
            rollout, calls, timings = _lazy(student, teacher, alpha, seed, max_new=16, stop_at_eos=stop_at_eos)
            steps = rollout.response_ids.shape[1]
            coins = mixture_coins(alpha, 16, torch.Generator().manual_seed(seed))[:steps]
            teacher_drawn = sum(coins)
            assert calls["teacher"] == teacher_drawn + (not coins[-1]), (seed, coins)
            assert calls["student"] == steps - teacher_drawn + coins[-1], (seed, coins)
            assert calls["teacher"] <= teacher_drawn + 1 and timings["teacher"] > 0 and timings["decode"] > 0
            seen_catch_up[not coins[-1]] += 1
    # Both endings (last token from the student: a teacher catch-up; from the teacher: none) occurred.
    assert min(seen_catch_up.values()) >= 2, seen_catch_up


def test_the_same_generator_state_replays_the_same_rollouts():
    """A resumed run restores its generator and must regenerate the same rollouts bit for bit
    (coins, tokens, records): state saved between two rollouts, restored into a new generator."""
    teacher, student = _teacher_student("gpt2")
    generator = torch.Generator().manual_seed(9)
    first, _, _ = _lazy(student, teacher, 0.3, None, generator=generator)
    state = generator.get_state()
    second, _, _ = _lazy(student, teacher, 0.3, None, generator=generator)
    resumed_generator = torch.Generator()
    resumed_generator.set_state(state)
    resumed, _, _ = _lazy(student, teacher, 0.3, None, generator=resumed_generator)
    for field in fields(second):
        value = getattr(second, field.name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, getattr(resumed, field.name)), field.name
        else:
            assert value == getattr(resumed, field.name), field.name
    assert not torch.equal(first.response_ids, second.response_ids)  # the state moved on between them


def test_coins_are_bernoulli_alpha_and_drawn_from_the_generator():
    pytest.importorskip("scipy")
    from scipy.stats import binomtest

    coins = mixture_coins(0.2, 20000, torch.Generator().manual_seed(0))
    assert binomtest(sum(coins), len(coins), 0.2).pvalue > 1e-3
    assert coins == mixture_coins(0.2, 20000, torch.Generator().manual_seed(0))
    assert coins != mixture_coins(0.2, 20000, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert mixture_coins(0.0, 5, generator) == [False] * 5 and mixture_coins(1.0, 5, generator) == [True] * 5
    assert torch.equal(generator.get_state(), state)  # certain coins draw nothing
