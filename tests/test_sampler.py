"""The teacher-mixed sampler and the model helpers.

The sampler's records are checked against an independent teacher-forced recomputation (each row
unpadded, no KV cache, float64 log-softmax), its distribution against an exact enumeration of
every response with a chi-square test that is also shown to reject a wrong sampler, for both
mixings (lazy and every-step). Longer than ~400 lines because these checks share the tiny models,
the ragged prompts and the teacher-forced reference, and test_lazy_sampler.py imports them.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_lm
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from minillm_rl.algorithm.cached_lm import CachedLM, mixture_coins
from minillm_rl.algorithm.forward import position_ids_from_mask
from minillm_rl.algorithm.logits import process_logits
from minillm_rl.models import (
    check_tokenizers_compatible,
    evenly_spaced_layers,
    load_causal_lm,
    prune_student,
)
from minillm_rl.algorithm.sampler import (
    Rollout,
    SamplingConfig,
    sample_categorical,
    sample_rollouts,
)

torch.set_num_threads(2)

VOCAB, PAD, EOS = 16, 0, 1
PROMPT_LENGTHS = [3, 5, 1, 4, 5, 2, 4, 3]
MAX_NEW = 8
EOS_LOGIT_BOOST = 1.0


def _ragged_prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[B, P]`` prompts of the lengths in PROMPT_LENGTHS (no EOS/pad inside)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(PROMPT_LENGTHS)
    ids = torch.full((len(PROMPT_LENGTHS), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        ids[row, width - length:] = torch.randint(2, VOCAB, (length,), generator=gen)
        mask[row, width - length:] = 1
    return ids, mask


def _boost_eos(model, amount: float = EOS_LOGIT_BOOST):
    """Raise the EOS logit so some rows stop early while others run to the length cap."""

    def hook(module, inputs, logits):
        return logits + amount * (torch.arange(logits.shape[-1]) == EOS)

    model.get_output_embeddings().register_forward_hook(hook)
    return model


def _teacher_student(arch: str):
    teacher = make_tiny_lm(arch, VOCAB, num_layers=3, seed=1, init_std=0.3)
    # A pruned student exercises prune_student's layer re-indexing under KV-cached decoding.
    student = prune_student(make_tiny_lm(arch, VOCAB, num_layers=3, seed=2, init_std=0.3), [0, 2])
    return _boost_eos(teacher), _boost_eos(student)


@torch.no_grad()
def _reference_logprobs(model, prompt: torch.Tensor, response: torch.Tensor, cfg: SamplingConfig):
    """Processed and raw ``[n, V]`` float64 log-distributions predicting each response token."""
    sequence = torch.cat([prompt, response]).unsqueeze(0)
    logits = model(sequence).logits[0, len(prompt) - 1: len(prompt) - 1 + len(response)]
    processed = process_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p).double().log_softmax(-1)
    return processed, logits.double().log_softmax(-1)


def _check_against_teacher_forcing(rollout: Rollout, student, teacher, cfg: SamplingConfig, atol=1e-4,
                                   dist_rtol=0.0):
    width = rollout.response_ids.shape[1]
    lengths = rollout.response_mask.sum(-1).long()
    assert width == int(lengths.max())
    for row in range(rollout.prompt_ids.shape[0]):
        n = int(lengths[row])
        response = rollout.response_ids[row, :n]
        # Mask: 1 through the first EOS (or the length cap), 0 and pad afterwards.
        assert torch.equal(rollout.response_mask[row, :n], torch.ones(n))
        assert not (response[:-1] == EOS).any()
        assert response[-1] == EOS or n == cfg.max_new_tokens
        assert (rollout.response_ids[row, n:] == PAD).all()

        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
        student_all, _ = _reference_logprobs(student, prompt, response, cfg)
        teacher_all, teacher_raw_all = _reference_logprobs(teacher, prompt, response, cfg)
        index = response.unsqueeze(-1)
        student_lp = student_all.gather(-1, index).squeeze(-1)
        teacher_lp = teacher_all.gather(-1, index).squeeze(-1)
        mixture_lp = torch.log(cfg.alpha * teacher_lp.exp() + (1 - cfg.alpha) * student_lp.exp())
        expected = {
            "student_logprobs": student_lp,
            "teacher_logprobs": teacher_lp,
            "mixture_logprobs": mixture_lp,
            "teacher_logprobs_raw": teacher_raw_all.gather(-1, index).squeeze(-1),
        }
        for name, values in expected.items():
            recorded = getattr(rollout, name)[row]
            torch.testing.assert_close(recorded[:n].double(), values, atol=atol, rtol=0, msg=name)
            assert (recorded[n:] == 0).all(), name
        if cfg.teacher_dist == "exact":
            dist = rollout.teacher_dist_logprobs[row]
            torch.testing.assert_close(dist[:n].double(), teacher_raw_all, atol=atol, rtol=dist_rtol)
            assert (dist[n:] == 0).all()
        if cfg.teacher_dist == "topk":
            values, ids = rollout.teacher_topk_logprobs[row], rollout.teacher_topk_ids[row]
            torch.testing.assert_close(values[:n].double(), teacher_raw_all.gather(-1, ids[:n]), atol=atol, rtol=0)
            kth_largest = teacher_raw_all.topk(cfg.teacher_topk, dim=-1).values[:, -1:]
            assert (values[:n].double() >= kth_largest - atol).all()
            assert (values[n:] == 0).all() and (ids[n:] == 0).all()


CASES = [
    # arch, alpha, teacher_dist, temperature, top_k
    ("gpt2", 0.2, "exact", 1.0, 0),
    ("gpt2", 0.0, "topk", 1.0, 0),
    ("gpt2", 0.5, "none", 1.0, 0),
    ("opt", 0.2, "topk", 1.0, 0),
    ("opt", 1.0, "exact", 1.0, 0),
    ("llama", 0.2, "exact", 0.8, 5),
    ("llama", 0.0, "exact", 0.8, 5),
    ("llama", 0.7, "exact", 1.0, 0),
    ("llama", 1.0, "topk", 1.0, 0),
]


@pytest.mark.parametrize("mixing", ["lazy", "every_step"])
@pytest.mark.parametrize("arch,alpha,teacher_dist,temperature,top_k", CASES)
def test_records_match_teacher_forcing(arch, alpha, teacher_dist, temperature, top_k, mixing):
    teacher, student = _teacher_student(arch)
    prompt_ids, prompt_mask = _ragged_prompts()
    cfg = SamplingConfig(
        alpha=alpha, temperature=temperature, top_k=top_k, max_new_tokens=MAX_NEW,
        teacher_dist=teacher_dist, teacher_topk=4, mixing=mixing,
    )
    rollout = sample_rollouts(
        student, teacher, prompt_ids, prompt_mask, cfg, eos_token_id=EOS, pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0), policy_version=7,
    )
    lengths = rollout.response_mask.sum(-1)
    assert (lengths < MAX_NEW).any() and (lengths == MAX_NEW).any(), "want early stops and full-length rows"
    assert rollout.policy_version == 7 and rollout.alpha == alpha
    assert torch.equal(rollout.token_policy_versions, 7 * rollout.response_mask.long())
    assert (rollout.teacher_dist_logprobs is None) == (teacher_dist != "exact")
    assert (rollout.teacher_topk_ids is None) == (teacher_dist != "topk")
    _check_against_teacher_forcing(rollout, student, teacher, cfg)


@pytest.mark.parametrize("mixing", ["lazy", "every_step"])
@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_records_match_teacher_forcing_in_float64(alpha, mixing):
    """float64 models and a float64 shipped distribution, so the only difference left from the
    recomputation is the sampler's float32 log-softmax (< 1e-6 here; allowed 1e-6 instead of
    1e-4): a record taken at a neighbouring position or from a forward that saw the wrong tokens
    is off by orders of magnitude more."""
    teacher, student = (model.double() for model in _teacher_student("llama"))
    prompt_ids, prompt_mask = _ragged_prompts(seed=2)
    cfg = SamplingConfig(alpha=alpha, max_new_tokens=MAX_NEW, teacher_dist="exact",
                         teacher_dist_dtype=torch.float64, mixing=mixing)
    rollout = sample_rollouts(student, teacher, prompt_ids, prompt_mask, cfg, EOS, PAD,
                              generator=torch.Generator().manual_seed(2))
    assert rollout.teacher_dist_logprobs.dtype == torch.float64
    _check_against_teacher_forcing(rollout, student, teacher, cfg, atol=1e-6)


@pytest.mark.parametrize("arch,alpha,teacher_dist,temperature,top_k", [
    ("gpt2", 0.2, "exact", 1.0, 0), ("opt", 0.0, "topk", 1.0, 0), ("llama", 0.2, "exact", 0.8, 5)])
def test_records_match_teacher_forcing_in_bfloat16(arch, alpha, teacher_dist, temperature, top_k):
    """bf16 models (the rollout workers' ``model.dtype: bfloat16``) and the exact teacher
    distribution shipped in bf16, against a teacher-forced recomputation with the same bf16 models.

    Tolerance: the two paths (KV-cached decoding vs one forward over the whole sequence) round the
    same intermediates to bf16 but accumulate in other orders and shapes, so their logits differ by
    a few units in the last place (ulp) of the largest logit Z (bf16 keeps 8 significant bits: ulp
    = 2^(floor(log2 Z) - 7)); allowing 2 ulps per logit, a log-prob z_y - logsumexp(z) differs by
    at most twice that: 4 ulps. The shipped distribution is then rounded to bf16 itself: half an ulp
    of each log-prob, relative 2^-9 (allowed: 2^-8). Measured: at most 0.8 ulp. A record at the
    wrong position or from the wrong model is off by O(1)."""
    teacher, student = (model.to(torch.bfloat16) for model in _teacher_student(arch))
    prompt_ids, prompt_mask = _ragged_prompts()
    cfg = SamplingConfig(alpha=alpha, temperature=temperature, top_k=top_k, max_new_tokens=MAX_NEW,
                         teacher_dist=teacher_dist, teacher_topk=4, teacher_dist_dtype=torch.bfloat16)
    rollout = sample_rollouts(student, teacher, prompt_ids, prompt_mask, cfg, eos_token_id=EOS, pad_token_id=PAD,
                              generator=torch.Generator().manual_seed(0))
    if teacher_dist == "exact":
        assert rollout.teacher_dist_logprobs.dtype == torch.bfloat16
    largest_logit = 0.0
    with torch.no_grad():
        for row in range(prompt_ids.shape[0]):
            sequence = torch.cat([prompt_ids[row][prompt_mask[row].bool()],
                                  rollout.response_ids[row][rollout.response_mask[row].bool()]])
            for model in (teacher, student):
                largest_logit = max(largest_logit, float(model(sequence[None]).logits.abs().max()))
    ulp = 2.0 ** (math.floor(math.log2(largest_logit)) - 7)
    _check_against_teacher_forcing(rollout, student, teacher, cfg, atol=4 * ulp, dist_rtol=2.0**-8)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_decoding_uses_no_deprecated_transformers_api(arch):
    """transformers 5.24 renamed the KV-cache argument (``past_key_values`` -> ``cache``) and
    removes the old name in 5.40; the sampler must call the supported API (no warning per step)."""
    import warnings

    teacher, student = _teacher_student(arch)
    prompt_ids, prompt_mask = _ragged_prompts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample_rollouts(student, teacher, prompt_ids, prompt_mask, SamplingConfig(max_new_tokens=MAX_NEW),
                        eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    deprecations = [str(w.message) for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning)) or "deprecat" in str(w.message)]
    assert deprecations == []


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_lazy_and_every_step_agree_where_the_coins_are_certain(alpha):
    """At alpha 0 and 1 lazy mixing draws no coin, so the same seed draws the same tokens as
    every-step mixing (at alpha 1 ``lerp`` returns the teacher's probabilities exactly); the
    records agree (bit for bit at alpha 0, where both run the same forwards)."""
    teacher, student = _teacher_student("llama")
    prompt_ids, prompt_mask = _ragged_prompts(seed=3)

    def run(mixing):
        cfg = SamplingConfig(alpha=alpha, temperature=0.9, top_k=6, max_new_tokens=MAX_NEW, teacher_dist="exact",
                             mixing=mixing)
        calls = {}
        rollout = sample_rollouts(student, teacher, prompt_ids, prompt_mask, cfg, EOS, PAD,
                                  torch.Generator().manual_seed(5), forward_calls=calls)
        return rollout, calls

    (lazy, lazy_calls), (every, every_calls) = run("lazy"), run("every_step")
    steps = lazy.response_ids.shape[1]
    assert torch.equal(lazy.response_ids, every.response_ids) and torch.equal(lazy.response_mask, every.response_mask)
    exact = dict(atol=0, rtol=0) if alpha == 0 else dict(atol=1e-5, rtol=0)
    for name in ("student_logprobs", "teacher_logprobs", "mixture_logprobs", "teacher_logprobs_raw",
                 "teacher_dist_logprobs"):
        torch.testing.assert_close(getattr(lazy, name), getattr(every, name), **exact, msg=name)
    if alpha == 0:  # the student decodes, the teacher scores once
        assert lazy_calls == every_calls == {"student": steps, "teacher": 1}
    else:  # the teacher decodes, the student scores once (every step: both at every step)
        assert lazy_calls == {"student": 1, "teacher": steps} and every_calls == {"student": steps, "teacher": steps}


@torch.no_grad()
def _exact_response_distribution(student, teacher, prompt, vocab, eos, horizon, alphas):
    """Probability of every response (ends at EOS or after ``horizon`` tokens) when the token at
    step ``t`` is drawn from ``alphas[t] * p + (1 - alphas[t]) * q``."""
    probs = {}
    frontier = [((), 1.0)]
    for alpha in alphas[:horizon]:
        prefixes = [prefix for prefix, _ in frontier]
        batch = torch.tensor([list(prompt) + list(prefix) for prefix in prefixes])
        teacher_p = teacher(batch).logits[:, -1].double().softmax(-1)
        student_q = student(batch).logits[:, -1].double().softmax(-1)
        mixed = alpha * teacher_p + (1 - alpha) * student_q
        next_frontier = []
        for (prefix, prob), row in zip(frontier, mixed):
            for token in range(vocab):
                extended, p = prefix + (token,), prob * float(row[token])
                if token == eos or len(extended) == horizon:
                    probs[extended] = p
                else:
                    next_frontier.append((extended, p))
        frontier = next_frontier
    return probs


def _chi_square_pvalue(rollouts: list[Rollout], probs: dict) -> float:
    from scipy.stats import chisquare

    counts = dict.fromkeys(probs, 0)
    for rollout in rollouts:
        lengths = rollout.response_mask.sum(-1).long().tolist()
        for row, n in zip(rollout.response_ids.tolist(), lengths):
            counts[tuple(row[:n])] += 1
    total = sum(counts.values())
    outcomes = sorted(probs, key=probs.get)
    observed = [counts[o] for o in outcomes]
    expected = [probs[o] * total for o in outcomes]
    # Pool the rarest outcomes so every cell expects >= 5 draws (chi-square validity).
    while expected[0] < 5:
        rare_expected, rare_observed = expected.pop(0), observed.pop(0)
        expected[0] += rare_expected
        observed[0] += rare_observed
    return chisquare(observed, expected).pvalue


def test_stop_at_eos_false_runs_every_response_to_max_new_tokens():
    """With ``stop_at_eos=False`` (fixed-length benchmarks) EOS is sampled like any token and no
    response ends early; the same seed gives the same tokens as far as the default stopped."""
    teacher, student = _teacher_student("llama")
    prompt_ids, prompt_mask = _ragged_prompts(seed=3)
    stopping = sample_rollouts(student, teacher, prompt_ids, prompt_mask, SamplingConfig(max_new_tokens=MAX_NEW),
                               EOS, PAD, torch.Generator().manual_seed(1))
    assert stopping.response_mask.sum() < stopping.response_mask.numel()  # the test needs an early EOS
    running = sample_rollouts(student, teacher, prompt_ids, prompt_mask,
                              SamplingConfig(max_new_tokens=MAX_NEW, stop_at_eos=False), EOS, PAD,
                              torch.Generator().manual_seed(1))
    assert running.response_ids.shape[1] == MAX_NEW and bool(running.response_mask.bool().all())
    valid = stopping.response_mask.bool()
    width = stopping.response_ids.shape[1]
    assert torch.equal(running.response_ids[:, :width][valid], stopping.response_ids[valid])


CHI_VOCAB, CHI_EOS, CHI_HORIZON, CHI_PROMPT = 4, 3, 3, [0, 1, 2]


@pytest.fixture(scope="module")
def chi_models():
    teacher = make_tiny_lm("gpt2", CHI_VOCAB, seed=11, init_std=1.0)
    student = make_tiny_lm("gpt2", CHI_VOCAB, seed=12, init_std=1.0)
    return student, teacher


def _chi_draws(student, teacher, alpha, mixing, rows, calls=1, seed=123):
    """Responses of ``calls`` sampler calls of ``rows`` prompts each, as one Rollout-like list."""
    cfg = SamplingConfig(alpha=alpha, max_new_tokens=CHI_HORIZON, teacher_dist="none", mixing=mixing)
    prompt_ids = torch.tensor([CHI_PROMPT] * rows)
    generator = torch.Generator().manual_seed(seed)
    return [sample_rollouts(student, teacher, prompt_ids, torch.ones_like(prompt_ids), cfg, CHI_EOS, 0,
                            generator=generator) for _ in range(calls)]


@pytest.mark.parametrize("mixing,alpha", [("every_step", 0.3), ("lazy", 0.0), ("lazy", 0.2), ("lazy", 0.5),
                                          ("lazy", 1.0)])
def test_sampled_distribution_matches_exact_mixture(chi_models, mixing, alpha):
    """Each response is a draw from the mixture. Lazy mixing shares its coins within a call, so
    the rows of one call are independent only given the coins: where the coins are random
    (0 < alpha < 1) every lazy draw is its own call (1000 of them, on one thread: a call of these
    tiny models is all per-op overhead), else 20000 rows in one call."""
    pytest.importorskip("scipy")
    student, teacher = chi_models
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    probs = _exact_response_distribution(student, teacher, CHI_PROMPT, CHI_VOCAB, CHI_EOS, CHI_HORIZON,
                                         [alpha] * CHI_HORIZON)
    assert len(probs) == 1 + 3 + 9 + 27 and math.isclose(sum(probs.values()), 1.0, rel_tol=1e-9)
    independent_calls = mixing == "lazy" and 0 < alpha < 1
    try:
        draws = _chi_draws(student, teacher, alpha, mixing, rows=1 if independent_calls else 20000,
                           calls=1000 if independent_calls else 1)
    finally:
        torch.set_num_threads(threads)
    assert _chi_square_pvalue(draws, probs) > 1e-3
    # Power: the same draws are rejected against the student alone (what sampling without the
    # teacher would give), or at alpha 0 against the teacher alone.
    other = _exact_response_distribution(student, teacher, CHI_PROMPT, CHI_VOCAB, CHI_EOS, CHI_HORIZON,
                                         [1.0 if alpha == 0 else 0.0] * CHI_HORIZON)
    assert _chi_square_pvalue(draws, other) < 1e-3


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_lazy_rows_given_the_coins_follow_the_chosen_models(chi_models, alpha):
    """Within one lazy call, given its coins (re-drawn from the same seed), the rows are
    independent draws from the teacher at coin-1 steps and the student at coin-0 steps; the
    mixture's own distribution is rejected for them (they share the coins)."""
    pytest.importorskip("scipy")
    student, teacher = chi_models
    checked = set()
    for seed in range(40):
        coins = mixture_coins(alpha, CHI_HORIZON, torch.Generator().manual_seed(seed))
        if tuple(coins) in checked or all(coins) or not any(coins):
            continue
        checked.add(tuple(coins))
        draws = _chi_draws(student, teacher, alpha, "lazy", rows=20000, seed=seed)
        given_coins = _exact_response_distribution(student, teacher, CHI_PROMPT, CHI_VOCAB, CHI_EOS, CHI_HORIZON,
                                                   [float(c) for c in coins])
        mixture = _exact_response_distribution(student, teacher, CHI_PROMPT, CHI_VOCAB, CHI_EOS, CHI_HORIZON,
                                               [alpha] * CHI_HORIZON)
        assert _chi_square_pvalue(draws, given_coins) > 1e-3, coins
        assert _chi_square_pvalue(draws, mixture) < 1e-3, coins
        if len(checked) == 2:
            return
    pytest.fail(f"fewer than 2 mixed coin patterns in 40 seeds: {checked}")


def test_sample_categorical_frequencies_and_zero_probability_tokens():
    pytest.importorskip("scipy")
    from scipy.stats import chisquare

    # Unnormalised rows with zeros at both ends and in the middle: those ids must never appear.
    weights = torch.tensor([[0.0, 3.0, 0.0, 1.0, 6.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 2.0]])
    draws = sample_categorical(weights.repeat(10000, 1), torch.Generator().manual_seed(0)).view(10000, 2)
    assert (draws[:, 1] == 5).all()
    counts = torch.bincount(draws[:, 0], minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert chisquare(counts[[1, 3, 4]].tolist(), [3000.0, 1000.0, 6000.0]).pvalue > 1e-3
    # Same generator state, same draws.
    again = sample_categorical(weights.repeat(10000, 1), torch.Generator().manual_seed(0)).view(10000, 2)
    assert torch.equal(draws, again)


def _full_mask_and_positions(prompt_mask, slots):
    mask = torch.cat([prompt_mask, torch.ones(prompt_mask.shape[0], slots, dtype=prompt_mask.dtype)], 1)
    return mask, position_ids_from_mask(prompt_mask)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_cached_lm_scores_several_positions_as_one_at_a_time(arch):
    """One KV-cached forward over several new positions gives the logits of one forward per
    position, and both give those of a forward over the whole sequence without a cache (float64,
    tolerance 1e-10: a wrong position id, mask column or cache offset is off by far more). The
    decode fast path (base model + transposed head copy) is taken for the supported layouts; a
    model whose logits are not a linear map of the last hidden state (soft-capping here) falls
    back to the whole model and still agrees."""
    model = make_tiny_lm(arch, VOCAB, num_layers=2, seed=4, init_std=0.3).double()
    prompt_ids, prompt_mask = _ragged_prompts(seed=1)
    tokens = torch.randint(2, VOCAB, (prompt_ids.shape[0], MAX_NEW), generator=torch.Generator().manual_seed(0))
    full_ids = torch.cat([prompt_ids, tokens], 1)
    mask, positions = _full_mask_and_positions(prompt_mask, MAX_NEW)
    with torch.no_grad():
        expected = model(input_ids=full_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    expected = expected[:, prompt_ids.shape[1] - 1:-1]  # [B, MAX_NEW, V]: position t predicts tokens[:, t]

    def scored(schedule):
        lm = CachedLM(model, prompt_ids, mask, positions)
        with torch.no_grad():
            logits = torch.cat([lm.advance(to, tokens)[0] for to in schedule], 1)
        assert lm.calls == len(schedule) and lm.ready == schedule[-1] + 1
        return lm, logits

    one_at_a_time, stepped = scored(list(range(MAX_NEW)))
    assert one_at_a_time.head is not None
    scored_once, whole = scored([MAX_NEW - 1])  # e.g. the teacher at alpha 0: no head copy made
    assert scored_once.head is None
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-10)
    _, chunked = scored([2, 3, 6, MAX_NEW - 1])  # a first call over prompt + 2 tokens, then 1, 3, 1 new
    torch.testing.assert_close(stepped, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(chunked, expected, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="scored already"):
        one_at_a_time.advance(3, tokens)

    original_forward = model.forward

    def soft_capped(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    model.forward = soft_capped
    capped, capped_logits = scored([0, 4, MAX_NEW - 1])
    assert capped.head is None
    torch.testing.assert_close(capped_logits, 3.0 * torch.tanh(expected / 3.0), rtol=0, atol=1e-10)


def test_vocab_mismatch_is_refused():
    teacher = make_tiny_lm("gpt2", VOCAB)
    student = make_tiny_lm("gpt2", VOCAB + 1)
    prompt_ids, prompt_mask = _ragged_prompts()
    with pytest.raises(ValueError, match="vocabulary"):
        sample_rollouts(student, teacher, prompt_ids, prompt_mask, SamplingConfig(), EOS, PAD)


def test_bad_inputs_give_one_line_errors():
    with pytest.raises(ValueError, match="alpha"):
        SamplingConfig(alpha=1.5)
    with pytest.raises(ValueError, match="teacher_dist"):
        SamplingConfig(teacher_dist="full")
    with pytest.raises(ValueError, match="mixing must be 'lazy' or 'every_step', got 'sometimes'"):
        SamplingConfig(mixing="sometimes")
    model = make_tiny_lm("gpt2", VOCAB)
    right_padded = torch.tensor([[2, 3, 0]]), torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        sample_rollouts(model, model, *right_padded, SamplingConfig(), EOS, PAD)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_prune_student(arch):
    teacher = make_tiny_lm(arch, VOCAB, num_layers=4, seed=3, init_std=0.3)
    prompt_ids, prompt_mask = _ragged_prompts()
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)

    def logits(model):
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions).logits
        return out[prompt_mask.bool()]

    full_copy = prune_student(teacher, [0, 1, 2, 3])
    torch.testing.assert_close(logits(full_copy), logits(teacher), atol=1e-6, rtol=0)

    keep = [0, 3]
    student = prune_student(teacher, keep)
    assert student.config.num_hidden_layers == 2 and type(student) is type(teacher)
    teacher_params, student_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    for name, param in student_params.items():
        source = name
        for new, old in enumerate(keep):
            for stack in ("model.layers.", "transformer.h.", "model.decoder.layers."):
                if name.startswith(f"{stack}{new}."):
                    source = f"{stack}{old}." + name[len(f"{stack}{new}."):]
        assert torch.equal(param, teacher_params[source]), name
    assert not torch.equal(logits(student), logits(teacher))


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        evenly_spaced_layers(4, 5)


def _word_tokenizer(words: list[str], eos: str = "</s>") -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(["<unk>", "</s>", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos, pad_token="</s>")


def test_check_tokenizers_compatible():
    check_tokenizers_compatible(_word_tokenizer(["a", "b"]), _word_tokenizer(["a", "b"]))
    with pytest.raises(ValueError, match="vocab"):
        check_tokenizers_compatible(_word_tokenizer(["a", "b"]), _word_tokenizer(["a", "c"]))
    with pytest.raises(ValueError, match="special token"):
        check_tokenizers_compatible(_word_tokenizer(["a", "b"]), _word_tokenizer(["a", "b"], eos="<unk>"))
    with_template = _word_tokenizer(["a", "b"])
    with_template.chat_template = "{{ messages }}"
    with pytest.raises(ValueError, match="chat template"):
        check_tokenizers_compatible(_word_tokenizer(["a", "b"]), with_template)


def test_load_causal_lm_round_trip_and_missing_path(tmp_path):
    model = make_tiny_lm("llama", VOCAB)
    model.save_pretrained(tmp_path / "tiny")
    loaded = load_causal_lm(tmp_path / "tiny")
    for (name, param), (_, loaded_param) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(param, loaded_param), name
    with pytest.raises(ValueError, match="no such directory"):
        load_causal_lm(tmp_path / "missing")


@pytest.mark.slow
def test_gguf_to_hf_smollm2(tmp_path, smollm2_gguf):
    from minillm_rl.models import gguf_to_hf, load_tokenizer

    gguf_path = smollm2_gguf
    out = gguf_to_hf(gguf_path.parent, gguf_path.name, tmp_path / "smollm2")
    model, tokenizer = load_causal_lm(out), load_tokenizer(out)
    assert model.config.num_hidden_layers == 30 and tokenizer.eos_token_id == model.config.eos_token_id
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert tokenizer.decode(model(ids).logits[0, -1].argmax()).strip() == "Paris"
    assert gguf_to_hf(gguf_path.parent, gguf_path.name, out) == out  # complete: skipped
