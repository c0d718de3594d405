"""MiniLLM losses and advantages against plain float64 references.

The custom autograd Functions are checked for values and gradients against float64 autograd
through ``log_softmax``, with chunk sizes that split rows, split the batch unevenly and cover
the whole batch, on a strided slice of a larger logits tensor (as the learner passes them).
"""

from __future__ import annotations

import datetime
import math
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minillm_rl.algorithm.advantages import (
    AdvantageConfig,
    compute_advantages,
    importance_weights,
    reward_to_go,
    token_rewards,
    whiten,
)
from minillm_rl.algorithm.chunked_vocab import (
    reverse_kl_to_teacher,
    reverse_kl_to_teacher_topk,
    soft_cross_entropy,
    soft_cross_entropy_topk,
    token_logprobs,
)
from minillm_rl.algorithm.logits import process_logits
from minillm_rl.algorithm.losses import kd_loss, minillm_loss, policy_loss, pt_loss, sft_loss, single_step_loss

torch.set_num_threads(1)

B, T, V = 4, 5, 11
# Valid lengths: full row, ragged, EOS at the first position, all masked.
LENGTHS = [5, 3, 1, 0]
# chunk sizes (rows of B*T = 20): splits each row (2 < T), one row per block with a remainder
# (7: T <= 7 < 2T), two rows per block (11), everything at once (1000).
CHUNK_SIZES = [2, 7, 11, 1000]


def _mask(lengths=LENGTHS, width=T) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()


def _strided_logits(seed: int, scale: float = 2.0, vocab: int = V) -> torch.Tensor:
    """``[B, T, V]`` float32 leaf that is a non-contiguous slice, like ``logits[:, P-1:P+T-1]``."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + 3, vocab, generator=g) * scale
    return full[:, 2 : 2 + T].requires_grad_()


def _grad_of(fn, logits: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Value of ``fn(logits)`` and the gradient of ``sum(value * upstream)`` wrt ``logits``."""
    logits.grad = None
    value = fn(logits)
    (value * upstream).sum().backward()
    return value.detach(), logits.grad.detach().clone()


def _assert_matches_float64(fn, reference, logits: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """``fn`` (float32) equals float64 autograd ``reference`` in value and in the gradient of
    ``sum(value * upstream)``; returns ``fn``'s value."""
    got, got_grad = _grad_of(fn, logits, upstream.float())
    want, want_grad = _grad_of(reference, logits, upstream)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad.double(), atol=1e-5, rtol=1e-5)
    return got


def _upstream(seed: int) -> torch.Tensor:
    return torch.randn(B, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8)])
def test_token_logprobs_matches_float64_autograd(chunk_size, temperature, top_k, top_p):
    logits = _strided_logits(0)
    processed = process_logits(logits.detach(), temperature, top_k, top_p)
    # Tokens drawn from the processed distribution, as the sampler does (never a filtered one).
    token_ids = torch.multinomial(processed.softmax(-1).view(-1, V), 1, generator=torch.Generator().manual_seed(1))
    token_ids = token_ids.view(B, T)
    keep = processed > float("-inf")

    def reference(z):
        z64 = torch.where(keep, z.double() / temperature, torch.tensor(float("-inf"), dtype=torch.float64))
        return torch.log_softmax(z64, -1).gather(-1, token_ids[..., None]).squeeze(-1)

    upstream = _upstream(2)
    got, got_grad = _grad_of(lambda z: token_logprobs(z, token_ids, temperature, top_k, top_p, chunk_size),
                             logits, upstream.float())
    want, want_grad = _grad_of(reference, logits, upstream)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad.double(), atol=1e-5, rtol=1e-5)
    if top_k or top_p < 1:
        assert (got_grad[~keep] == 0).all(), "filtered tokens must get no gradient"


def test_token_logprobs_filtered_token_is_minus_inf_with_finite_gradient():
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0]]], requires_grad=True)
    value = token_logprobs(logits, torch.tensor([[3]]), top_k=2)
    assert value.item() == float("-inf")
    (value.clamp(min=-1e4) * 0).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_token_logprobs_bf16_logits_give_bf16_gradient():
    logits = _strided_logits(3).detach().bfloat16().requires_grad_()
    ids = torch.zeros(B, T, dtype=torch.long)
    token_logprobs(logits, ids, chunk_size=3).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    want = torch.log_softmax(logits.detach().double(), -1)[..., 0]
    torch.testing.assert_close(token_logprobs(logits, ids).double(), want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Full-vocabulary KL and soft cross-entropy
# ---------------------------------------------------------------------------------------------


def _teacher_logprobs(seed: int, scale: float = 3.0, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(B, T, vocab, generator=g, dtype=torch.float64) * scale, -1)


def _exact_reverse_kl64(z: torch.Tensor, teacher64: torch.Tensor) -> torch.Tensor:
    logq = torch.log_softmax(z.double(), -1)
    return (logq.exp() * (logq - teacher64)).sum(-1)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_reverse_kl_matches_float64_autograd(chunk_size):
    logits = _strided_logits(4)
    teacher64 = _teacher_logprobs(5)
    teacher = teacher64.float().requires_grad_()
    upstream = _upstream(6)
    got = _assert_matches_float64(lambda z: reverse_kl_to_teacher(z, teacher, chunk_size),
                                  lambda z: _exact_reverse_kl64(z, teacher64), logits, upstream)
    assert teacher.grad is None, "gradient must flow through the student only"
    assert (got >= -1e-6).all()


def test_reverse_kl_with_bf16_teacher_is_renormalised_and_nonnegative():
    logits = _strided_logits(7).detach()
    teacher64 = _teacher_logprobs(8)
    got = reverse_kl_to_teacher(logits, teacher64.bfloat16(), chunk_size=3)
    want = _exact_reverse_kl64(logits, torch.log_softmax(teacher64.bfloat16().double(), -1))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got >= -1e-6).all()


def _coarse_kl64(z: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """KL between the (top-K + tail)-coarsened student and teacher, written plainly in float64."""
    q = torch.softmax(z.double(), -1)
    q_top = q.gather(-1, topk_ids)
    q_tail = (1.0 - q_top.sum(-1)).clamp(min=0.0)
    p_top = topk_logprobs.double().exp()
    p_tail = (1.0 - p_top.sum(-1)).clamp(min=1e-30)
    tail_term = torch.where(q_tail > 1e-12, q_tail * (q_tail.clamp(min=1e-300).log() - p_tail.log()), 0.0)
    return (q_top * (q_top.log() - p_top.log())).sum(-1) + tail_term


@pytest.mark.parametrize("chunk_size", [3, 1000])
def test_topk_kl_with_k_equal_v_is_the_exact_kl(chunk_size):
    logits = _strided_logits(9)
    teacher64 = _teacher_logprobs(10)
    topk_logprobs, topk_ids = torch.topk(teacher64.float(), V, dim=-1)
    upstream = _upstream(11)
    _assert_matches_float64(lambda z: reverse_kl_to_teacher_topk(z, topk_logprobs, topk_ids, chunk_size),
                            lambda z: _exact_reverse_kl64(z, teacher64), logits, upstream)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_kl_matches_coarse_reference_and_lower_bounds_exact_kl(k):
    logits = _strided_logits(12)
    teacher64 = _teacher_logprobs(13)
    topk_logprobs, topk_ids = torch.topk(teacher64.float(), k, dim=-1)
    upstream = _upstream(14)
    got = _assert_matches_float64(lambda z: reverse_kl_to_teacher_topk(z, topk_logprobs, topk_ids, chunk_size=7),
                                  lambda z: _coarse_kl64(z, topk_logprobs, topk_ids), logits, upstream)
    exact = _exact_reverse_kl64(logits.detach(), teacher64)
    assert (got.double() <= exact + 1e-5).all()


def test_topk_kl_relative_error_on_a_peaked_teacher():
    """Informative: how much of the exact KL the top-K approximation keeps (the assert is the bound).

    Two students: an unrelated one (early training) and one near the teacher (its logits plus
    unit noise, the regime distillation reaches); the approximation is far better for the latter.
    """
    vocab = 256
    teacher_logits = torch.randn(B, T, vocab, generator=torch.Generator().manual_seed(16), dtype=torch.float64) * 5
    teacher64 = torch.log_softmax(teacher_logits, -1)
    noise = torch.randn(B, T, vocab, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    students = {"unrelated": _strided_logits(15, scale=1.5, vocab=vocab).detach(),
                "near-teacher": (teacher_logits + noise).float()}
    for name, logits in students.items():
        exact = _exact_reverse_kl64(logits, teacher64)
        for k in (1, 4, 16):
            topk_logprobs, topk_ids = torch.topk(teacher64.float(), k, dim=-1)
            approx = reverse_kl_to_teacher_topk(logits, topk_logprobs, topk_ids).double()
            assert (approx <= exact + 1e-5).all()
            rel = ((exact - approx) / exact).mean().item()
            print(f"top-K KL, V={vocab}, {name} student: K={k:2d} mean relative error {rel:.3f}")


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_soft_cross_entropy_matches_float64_autograd(chunk_size):
    logits = _strided_logits(17)
    teacher64 = _teacher_logprobs(18)
    upstream = _upstream(19)

    def reference(z):
        return -(teacher64.exp() * torch.log_softmax(z.double(), -1)).sum(-1)

    got = _assert_matches_float64(lambda z: soft_cross_entropy(z, teacher64.float(), chunk_size), reference, logits,
                                  upstream)
    # Teacher logits (unnormalised) give the same as its log-probs.
    shifted = (teacher64 + 7.0).float()
    torch.testing.assert_close(soft_cross_entropy(logits, shifted, chunk_size), got, atol=1e-5, rtol=1e-5)


def _coarse_soft_ce64(logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Float64 autograd reference: ``-sum_b P(b) log Q(b)`` over the K top buckets and the tail."""
    q = torch.log_softmax(logits.double(), -1)
    q_top = q.gather(-1, topk_ids)
    q_tail = torch.logsumexp(q.scatter(-1, topk_ids, float("-inf")), -1)
    p_top = topk_logprobs.double().exp()
    p_tail = 1.0 - p_top.sum(-1)
    p_tail = torch.where(p_tail > torch.finfo(torch.float32).eps, p_tail, 0.0)  # below: rounding
    return -((p_top * q_top).sum(-1) + torch.where(p_tail > 0, p_tail * q_tail, 0.0))


@pytest.mark.parametrize("k,chunk_size", [(1, 7), (3, 2), (8, 1000), (V, 11)])
def test_topk_soft_cross_entropy_matches_float64_coarse_reference(k, chunk_size):
    logits = _strided_logits(50)
    teacher64 = _teacher_logprobs(51)
    topk_logprobs, topk_ids = torch.topk(teacher64.float(), k, dim=-1)
    upstream = _upstream(52)
    got = _assert_matches_float64(lambda z: soft_cross_entropy_topk(z, topk_logprobs, topk_ids, chunk_size),
                                  lambda z: _coarse_soft_ce64(z, topk_logprobs, topk_ids), logits, upstream)
    if k == V:  # every token its own bucket: the exact soft cross-entropy
        exact = soft_cross_entropy(logits.detach(), teacher64.float(), chunk_size)
        torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# SFT / PT / KD
# ---------------------------------------------------------------------------------------------


def _labels() -> torch.Tensor:
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(20))
    return labels.masked_fill(_mask() == 0, -100)


def test_sft_loss_is_cross_entropy_over_unmasked_labels():
    logits = _strided_logits(21)
    labels = _labels()
    loss, stats = sft_loss(logits, labels)
    want = torch.nn.functional.cross_entropy(logits.detach().double().reshape(-1, V), labels.reshape(-1),
                                             ignore_index=-100)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert stats["tokens"] == sum(LENGTHS)


def test_pt_loss_mixes_ce_and_soft_ce_and_kd_loss_is_the_same_formula():
    logits = _strided_logits(22)
    labels = _labels()
    teacher64 = _teacher_logprobs(23)
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(logits.detach().double().reshape(-1, V), labels.reshape(-1),
                                           ignore_index=-100)
    soft = -(teacher64.exp() * torch.log_softmax(logits.detach().double(), -1)).sum(-1)[valid].mean()
    loss, stats = pt_loss(logits, labels, teacher64.float(), kd_ratio=0.3)
    assert loss.item() == pytest.approx((0.7 * ce + 0.3 * soft).item(), rel=1e-5)
    assert stats["soft_ce"] == pytest.approx(soft.item(), rel=1e-5)
    # KD baseline with teacher *logits*: same value.
    teacher_logits = teacher64 + 5.0 * torch.rand(B, T, 1, generator=torch.Generator().manual_seed(42))
    kd, _ = kd_loss(logits, teacher_logits.float(), labels, kd_ratio=0.3)
    assert kd.item() == pytest.approx(loss.item(), rel=1e-5)
    plain, _ = pt_loss(logits, labels, None)
    assert plain.item() == pytest.approx(ce.item(), rel=1e-5)
    # Top-K mode: the same mix with the coarse soft cross-entropy.
    topk = torch.topk(teacher64.float(), 4, dim=-1)
    coarse = _coarse_soft_ce64(logits.detach(), topk.values, topk.indices)[valid].mean()
    topk_loss, topk_stats = pt_loss(logits, labels, kd_ratio=0.3, teacher_topk=(topk.values, topk.indices))
    assert topk_loss.item() == pytest.approx((0.7 * ce + 0.3 * coarse).item(), rel=1e-5)
    assert topk_stats["soft_ce"] == pytest.approx(coarse.item(), rel=1e-5)


def test_all_ignored_labels_give_zero_loss_with_zero_gradient():
    logits = _strided_logits(24)
    loss, stats = pt_loss(logits, torch.full((B, T), -100), _teacher_logprobs(25).float())
    loss.backward()
    assert loss.item() == 0.0 and stats["tokens"] == 0
    assert (logits.grad == 0).all()


# ---------------------------------------------------------------------------------------------
# Importance weights, rewards, reward-to-go, whitening, advantages
# ---------------------------------------------------------------------------------------------


def _logprob_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(B, T, generator=g) * 8, -torch.rand(B, T, generator=g) * 8


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.9, 1.0])
def test_importance_weights_match_float64_and_respect_bounds(alpha):
    student, teacher = _logprob_pair(26)
    w = importance_weights(student, teacher, alpha)
    q, p = student.double().exp(), teacher.double().exp()
    torch.testing.assert_close(w.double(), q / (alpha * p + (1 - alpha) * q), atol=1e-6, rtol=1e-5)
    assert (w > 0).all()
    if alpha < 1:
        assert (w <= 1 / (1 - alpha) * (1 + 1e-6)).all()


def test_importance_weights_alpha_zero_is_exactly_one_and_mask_zeroes():
    student, teacher = _logprob_pair(27)
    assert (importance_weights(student, teacher, 0.0) == 1).all()
    w = importance_weights(student, teacher, 0.2, response_mask=_mask())
    assert (w[_mask() == 0] == 0).all()
    with pytest.raises(ValueError, match="alpha"):
        importance_weights(student, teacher, 1.5)


def test_token_rewards_scale_clip_and_mask():
    teacher = torch.tensor([[-1.0, -50.0, -2.0]])
    student = torch.tensor([[-2.0, -1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    r = token_rewards(teacher, student, mask, reward_scaling=0.5, reward_clip=10.0)
    assert r.tolist() == [[2.0, -10.0, 0.0]]


def _reward_to_go_loop(rewards, mask, gamma, normalize, include_current):
    out = torch.zeros_like(rewards, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        n_valid = int(mask[b].sum())
        for t in range(n_valid):
            start = t if include_current else t + 1
            total = sum(gamma ** (k - start) * float(rewards[b, k]) for k in range(start, n_valid))
            count = n_valid - start
            if normalize:
                total = total / count if count else 0.0
            out[b, t] = total
    return out


@pytest.mark.parametrize("gamma", [0.95, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("include_current", [True, False])
def test_reward_to_go_matches_double_loop(gamma, normalize, include_current):
    mask = _mask([7, 4, 1, 0], 7)
    rewards = torch.randn(4, 7, generator=torch.Generator().manual_seed(28)) * mask
    got = reward_to_go(rewards, mask, gamma, normalize, include_current)
    want = _reward_to_go_loop(rewards, mask, gamma, normalize, include_current)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got[mask == 0] == 0).all()


def _whiten_reference(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    selected = values.double()[mask > 0]
    mean, var = selected.mean(), selected.var(unbiased=False)
    return torch.where(mask > 0, (values.double() - mean) / torch.sqrt(var + 1e-8), 0.0)


def test_whiten_uses_valid_tokens_only():
    mask = _mask()
    values = (torch.randn(B, T, generator=torch.Generator().manual_seed(29)) + 3.0) * mask
    got = whiten(values, mask)
    torch.testing.assert_close(got.double(), _whiten_reference(values, mask), atol=1e-5, rtol=1e-5)
    # Including the padded zeros in the statistics (the reference code's choice) differs.
    with_padding = _whiten_reference(values, torch.ones_like(mask)) * mask
    assert (got.double() - with_padding).abs().max() > 0.1
    assert got[mask > 0].mean().abs() < 1e-5 and got[mask > 0].std(unbiased=False).sub(1).abs() < 1e-4
    assert (whiten(values, torch.zeros_like(mask)) == 0).all()


def _whiten_rank(rank: int, world: int, init_file: str, values, mask, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        shard = slice(rank * 2, rank * 2 + 2)
        torch.save(whiten(values[shard], mask[shard]), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_whiten_across_two_gloo_ranks_equals_whitening_the_concatenation():
    mask = _mask()
    values = (torch.randn(B, T, generator=torch.Generator().manual_seed(30)) * 2 - 1) * mask
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_whiten_rank, args=(2, os.path.join(tmp, "init"), values, mask, tmp), nprocs=2, join=True)
        got = torch.cat([torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)])
    torch.testing.assert_close(got, whiten(values, mask), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.double(), _whiten_reference(values, mask), atol=1e-5, rtol=1e-5)


def _fake_rollout(seed: int) -> SimpleNamespace:
    student, teacher = _logprob_pair(seed)
    mask = _mask()
    return SimpleNamespace(student_logprobs=student * mask, teacher_logprobs_raw=teacher * mask, response_mask=mask)


def test_compute_advantages_reference_and_paper_variants():
    rollout = _fake_rollout(31)
    mask = rollout.response_mask
    advantages, rewards = compute_advantages(rollout)
    want_rewards = ((rollout.teacher_logprobs_raw - rollout.student_logprobs) / 0.5).clamp(-100, 100) * mask
    torch.testing.assert_close(rewards, want_rewards)
    want = _whiten_reference(_reward_to_go_loop(rewards, mask, 0.95, True, True), mask)
    torch.testing.assert_close(advantages.double(), want, atol=1e-5, rtol=1e-5)

    paper, _ = compute_advantages(rollout, AdvantageConfig.paper())
    want = (_reward_to_go_loop(rewards, mask, 1.0, True, False) + 1.0) * mask  # A = G - b, b = -1
    torch.testing.assert_close(paper.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="baseline"):
        AdvantageConfig(baseline="critic")


# ---------------------------------------------------------------------------------------------
# Policy gradient, single-step and total loss
# ---------------------------------------------------------------------------------------------


def _policy_reference(logprobs, old, weights, advantages, mask, eps):
    rho = weights.double() * torch.exp(logprobs - old.double())
    per_token = torch.maximum(-advantages.double() * rho, -advantages.double() * rho.clamp(1 - eps, 1 + eps))
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("shift", [0.0, 0.05, 0.6])  # ratio 1, inside and well outside the clip range
def test_policy_loss_matches_float64_reference(shift):
    g = torch.Generator().manual_seed(32)
    mask = _mask()
    old = (-torch.rand(B, T, generator=g) * 4) * mask
    weights = importance_weights(old, (-torch.rand(B, T, generator=g) * 4) * mask, 0.2, mask)
    advantages = torch.randn(B, T, generator=g) * mask
    new = (old + shift * torch.randn(B, T, generator=g)).requires_grad_()
    loss, stats = policy_loss(new, old, weights, advantages, mask, clip_eps=0.2)
    loss.backward()
    new64 = new.detach().double().requires_grad_()
    want = _policy_reference(new64, old, weights, advantages, mask, 0.2)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(new.grad.double(), new64.grad, atol=1e-6, rtol=1e-5)
    assert (new.grad[mask == 0] == 0).all()
    if shift == 0.0:  # first PPO epoch: rho == w
        assert stats["ratio_mean"] == pytest.approx((weights * mask).sum().item() / mask.sum().item(), rel=1e-6)
        assert stats["approx_kl"] == 0.0
    if shift == 0.6:
        assert stats["clip_frac"] > 0.2
    assert 0.0 <= stats["clip_frac"] <= 1.0


def test_policy_loss_clipping_active_and_inactive():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    weights = torch.ones(1, 2)
    # A > 0 and rho = e^0.5 > 1.2: clipped, no gradient. A < 0 and rho = e^0.5: unclipped, grad -A rho.
    new = torch.full((1, 2), 0.5, requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0]])
    loss, stats = policy_loss(new, old, weights, advantages, mask, clip_eps=0.2)
    loss.backward()
    rho = math.exp(0.5)
    assert loss.item() == pytest.approx((-1.2 + rho) / 2)
    assert new.grad.tolist()[0] == pytest.approx([0.0, rho / 2])
    assert stats["clip_frac"] == 0.5


def test_single_step_loss_accepts_dense_topk_and_rollout_and_weights():
    logits = _strided_logits(33)
    teacher = _teacher_logprobs(34).float()
    mask = _mask()
    kl64 = _exact_reverse_kl64(logits.detach(), teacher.double())
    dense, stats = single_step_loss(logits, teacher, mask)
    assert dense.item() == pytest.approx(((kl64 * mask).sum() / mask.sum()).item(), rel=1e-5)
    topk = torch.topk(teacher, V, dim=-1)
    as_pair, _ = single_step_loss(logits, (topk.values, topk.indices), mask)
    rollout = SimpleNamespace(teacher_dist_logprobs=None, teacher_topk_logprobs=topk.values,
                              teacher_topk_ids=topk.indices)
    as_rollout, _ = single_step_loss(logits, rollout, mask)
    assert as_pair.item() == pytest.approx(dense.item(), rel=1e-5)
    assert as_rollout.item() == pytest.approx(dense.item(), rel=1e-5)
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(35)) * mask
    weighted, wstats = single_step_loss(logits, teacher, mask, weights=weights)
    assert weighted.item() == pytest.approx(((kl64 * weights).sum() / mask.sum()).item(), rel=1e-5)
    assert wstats["kl"] == pytest.approx(stats["kl"])
    empty = SimpleNamespace(teacher_dist_logprobs=None, teacher_topk_logprobs=None, teacher_topk_ids=None)
    with pytest.raises(ValueError, match="teacher_dist='none'"):
        single_step_loss(logits, empty, mask)


def test_minillm_loss_is_the_sum_of_its_terms():
    logits = _strided_logits(36)
    mask = _mask()
    response_ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(37)) * mask.long()
    rollout = SimpleNamespace(
        response_ids=response_ids, response_mask=mask,
        student_logprobs=token_logprobs(logits.detach(), response_ids) * mask,
        teacher_dist_logprobs=_teacher_logprobs(38).float(), teacher_topk_logprobs=None, teacher_topk_ids=None,
    )
    advantages = torch.randn(B, T, generator=torch.Generator().manual_seed(39)) * mask
    weights = torch.ones(B, T) * mask
    pt = pt_loss(_strided_logits(40), _labels())
    total, stats = minillm_loss(logits, rollout, advantages, weights, pt=pt, lm_coef=0.5)
    pg, _ = policy_loss(token_logprobs(logits, response_ids), rollout.student_logprobs, weights, advantages, mask)
    single, _ = single_step_loss(logits, rollout.teacher_dist_logprobs, mask)
    assert total.item() == pytest.approx((pg + single + 0.5 * pt[0]).item(), rel=1e-6)
    assert stats["pg/ratio_mean"] == pytest.approx(1.0, rel=1e-6)
    assert {"pg/loss", "single/kl", "pt/ce", "loss"} <= set(stats)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_raises_one_line_value_errors():
    logits = _strided_logits(41)
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, 11\)"):
        token_logprobs(logits, torch.full((B, T), V))
    with pytest.raises(ValueError, match="token_ids must have shape"):
        token_logprobs(logits, torch.zeros(B, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be \[batch, length, vocab\]"):
        reverse_kl_to_teacher(logits[0], logits[0])
    with pytest.raises(ValueError, match="teacher_topk_ids must have shape"):
        reverse_kl_to_teacher_topk(logits, torch.zeros(B, T, 2), torch.zeros(B, T, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        soft_cross_entropy(logits, logits, chunk_size=0)
    with pytest.raises(ValueError, match="advantages must have shape"):
        policy_loss(torch.zeros(B, T), torch.zeros(B, T), torch.ones(B, T), torch.zeros(B, 1), _mask())
    with pytest.raises(ValueError, match="kd_ratio"):
        pt_loss(logits, _labels(), None, kd_ratio=2.0)
