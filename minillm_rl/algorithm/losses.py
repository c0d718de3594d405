"""MiniLLM losses (algorithm.md §4-§5) as pure tensor functions.

Full-vocabulary terms use the chunked autograd functions of :mod:`minillm_rl.algorithm.chunked_vocab`
(no extra ``[B, T, V]`` float tensors). "Mean over valid tokens" is ``sum(x * mask) / sum(mask)``
(0 when nothing is valid). Stats are plain floats for logging.
"""

from __future__ import annotations

import torch

from minillm_rl.algorithm.advantages import masked_mean
from minillm_rl.algorithm.chunked_vocab import (
    DEFAULT_CHUNK_SIZE,
    check_aligned,
    check_logits,
    reverse_kl_to_teacher,
    reverse_kl_to_teacher_hidden,
    reverse_kl_to_teacher_topk,
    soft_cross_entropy,
    soft_cross_entropy_hidden,
    soft_cross_entropy_topk,
    token_logprobs,
)
from minillm_rl.algorithm.teacher_head import HiddenTeacher, TeacherHead

__all__ = ["kd_loss", "minillm_loss", "policy_loss", "pt_loss", "sft_loss", "single_step_loss"]

IGNORE_INDEX = -100


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    weights: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped, importance-weighted policy gradient (algorithm.md §4.1).

    ``rho = w * exp(logprobs - old_logprobs)``; per token ``max(-A rho, -A clip(rho, 1-eps, 1+eps))``
    (the clip acts on the product); mean over valid tokens.

    Args:
        logprobs: ``[B, T]`` current processed log q_theta(y_t) (differentiable).
        old_logprobs, weights, advantages, response_mask: ``[B, T]`` from the rollout.

    Returns:
        ``(loss, stats)``; stats: ``clip_frac`` (valid tokens where the clipped term is active),
        ``ratio_mean`` (mean rho), ``approx_kl`` (k3 estimate of KL(q_old || q_theta):
        mean of ``r - 1 - log r`` with ``r = q_theta / q_old``).
    """
    if clip_eps <= 0:
        raise ValueError(f"policy_loss: clip_eps must be > 0, got {clip_eps}")
    for field, tensor in (("old_logprobs", old_logprobs), ("weights", weights), ("advantages", advantages),
                          ("response_mask", response_mask)):
        check_aligned("policy_loss", field, tensor, logprobs.shape)
    # With top-k/top-p, a token drawn from the teacher part of the mixture can lie outside the
    # student's processed support: q_old(y) = 0, so w = 0 and the token carries no policy
    # gradient. Its ratio (0/0) is replaced by 1 so that no NaN reaches the loss or gradient.
    in_support = weights > 0
    log_ratio = torch.where(in_support, logprobs - old_logprobs, torch.zeros_like(logprobs))
    rho = weights * torch.exp(log_ratio)
    unclipped = -advantages * rho
    clipped = -advantages * rho.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), response_mask)
    with torch.no_grad():
        stats = {
            "loss": loss.item(),
            "clip_frac": masked_mean((clipped > unclipped).float(), response_mask).item(),
            "ratio_mean": masked_mean(rho, response_mask).item(),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask).item(),
            "outside_student_support": masked_mean((~in_support).float(), response_mask).item(),
        }
    return loss, stats


TeacherDist = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | HiddenTeacher


def _per_position_reverse_kl(student_logits: torch.Tensor, teacher, chunk_size: int | None) -> torch.Tensor:
    """Dispatch on the teacher form: dense ``[B,T,V]``, ``(topk_logprobs, topk_ids)``,
    ``HiddenTeacher``, or a rollout with a dense or top-K distribution."""
    if isinstance(teacher, HiddenTeacher):
        return reverse_kl_to_teacher_hidden(student_logits, teacher, chunk_size)
    if getattr(teacher, "teacher_hidden", None) is not None:
        raise ValueError("single_step_loss: a rollout sampled with teacher_dist='hidden' carries the teacher's hidden "
                         "states; pass HiddenTeacher(rollout.teacher_hidden, teacher_head)")
    if isinstance(teacher, torch.Tensor):
        return reverse_kl_to_teacher(student_logits, teacher, chunk_size)
    if isinstance(teacher, tuple) and len(teacher) == 2:
        return reverse_kl_to_teacher_topk(student_logits, teacher[0], teacher[1], chunk_size)
    dense = getattr(teacher, "teacher_dist_logprobs", None)
    topk_logprobs = getattr(teacher, "teacher_topk_logprobs", None)
    topk_ids = getattr(teacher, "teacher_topk_ids", None)
    if dense is not None:
        return reverse_kl_to_teacher(student_logits, dense, chunk_size)
    if topk_logprobs is not None and topk_ids is not None:
        return reverse_kl_to_teacher_topk(student_logits, topk_logprobs, topk_ids, chunk_size)
    raise ValueError(
        "single_step_loss: teacher must be a [B,T,V] log-prob tensor, a (topk_logprobs, topk_ids) pair, or a "
        f"rollout with teacher_dist_logprobs or teacher_topk_logprobs/ids set; got {type(teacher).__name__} "
        "with neither (was it sampled with teacher_dist='none'?)"
    )


def single_step_loss(
    student_logits: torch.Tensor,
    teacher: TeacherDist,
    response_mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Single-step term (algorithm.md §4.3): mean over valid tokens of ``KL(q_theta || p)``.

    Args:
        student_logits: ``[B, T, V]`` raw logits at the response positions.
        teacher: dense ``[B, T, V]`` teacher log-distribution, a ``(topk_logprobs, topk_ids)`` pair
            (approximate, see :func:`reverse_kl_to_teacher_topk`), a ``Rollout`` carrying either, or
            a :class:`HiddenTeacher` (exact, from hidden states ``[B, T, d]`` and the LM head).
        response_mask: ``[B, T]``.
        weights: ``None`` (reference: unweighted) or ``[B, T]`` importance weights (paper variant).

    Returns:
        ``(loss, stats)``; stats: ``loss`` and ``kl`` (the unweighted mean KL).
    """
    check_aligned("single_step_loss", "response_mask", response_mask, student_logits.shape[:2])
    kl = _per_position_reverse_kl(student_logits, teacher, chunk_size)
    if weights is None:
        loss = masked_mean(kl, response_mask)
    else:
        check_aligned("single_step_loss", "weights", weights, kl.shape)
        loss = masked_mean(weights * kl, response_mask)
    with torch.no_grad():
        stats = {"loss": loss.item(), "kl": masked_mean(kl, response_mask).item()}
    return loss, stats


def sft_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy, mean over ``labels != -100``.

    Args:
        student_logits: ``[B, L, V]``; position ``i`` predicts ``labels[:, i]`` (already shifted).
        labels: ``[B, L]`` long, ``-100`` = ignore.

    Returns:
        ``(loss, stats)``; stats: ``loss``, ``tokens`` (number of counted labels).
    """
    check_logits("sft_loss", student_logits)
    check_aligned("sft_loss", "labels", labels, student_logits.shape[:2])
    valid = labels != IGNORE_INDEX
    logprobs = token_logprobs(student_logits, torch.where(valid, labels, 0), chunk_size=chunk_size)
    loss = -masked_mean(logprobs, valid)
    return loss, {"loss": loss.item(), "tokens": float(valid.sum().item())}


def pt_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logprobs: torch.Tensor | None = None,
    kd_ratio: float = 0.5,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    *,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher_hidden: HiddenTeacher | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(1 - kd_ratio) CE(next token) + kd_ratio * (-sum_v p(v) log q(v))`` (algorithm.md §4.4).

    Both terms are means over ``labels != -100``; with no teacher it is the plain LM loss. Also
    the word-level KD baseline (:func:`kd_loss`).

    Args:
        student_logits: ``[B, L, V]``; position ``i`` predicts ``labels[:, i]``.
        labels: ``[B, L]`` long, ``-100`` = ignore.
        teacher_logprobs: ``[B, L, V]`` teacher log-probs or logits at the same positions, or None.
        teacher_topk: instead of ``teacher_logprobs``, the teacher's top-K ``(log-probs, ids)``,
            each ``[B, L, K]`` (:func:`soft_cross_entropy_topk`).
        teacher_hidden: instead of either, the teacher's hidden states ``[B, L, d]`` and LM head
            (:func:`soft_cross_entropy_hidden`, exact).

    Returns:
        ``(loss, stats)``; stats: ``loss``, ``ce``, ``tokens`` and, with a teacher, ``soft_ce``.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"pt_loss: kd_ratio must be in [0, 1], got {kd_ratio}")
    given = [form is not None for form in (teacher_logprobs, teacher_topk, teacher_hidden)]
    if sum(given) > 1:
        raise ValueError("pt_loss: pass at most one of teacher_logprobs, teacher_topk, teacher_hidden")
    ce, stats = sft_loss(student_logits, labels, chunk_size)
    stats = {"ce": stats["loss"], "tokens": stats["tokens"]}
    if not any(given):
        loss = ce
    else:
        if teacher_hidden is not None:
            per_position = soft_cross_entropy_hidden(student_logits, teacher_hidden, chunk_size)
        elif teacher_topk is not None:
            per_position = soft_cross_entropy_topk(student_logits, *teacher_topk, chunk_size)
        else:
            per_position = soft_cross_entropy(student_logits, teacher_logprobs, chunk_size)
        soft_ce = masked_mean(per_position, labels != IGNORE_INDEX)
        loss = (1.0 - kd_ratio) * ce + kd_ratio * soft_ce
        stats["soft_ce"] = soft_ce.item()
    stats["loss"] = loss.item()
    return loss, stats


def kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | HiddenTeacher,
    labels: torch.Tensor,
    kd_ratio: float = 0.5,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Word-level KD baseline (algorithm.md §5) on ground-truth responses: :func:`pt_loss` with a
    teacher given as ``[B, T, V]`` logits / log-probs or as a :class:`HiddenTeacher`."""
    if isinstance(teacher, HiddenTeacher):
        return pt_loss(student_logits, labels, None, kd_ratio, chunk_size, teacher_hidden=teacher)
    return pt_loss(student_logits, labels, teacher, kd_ratio, chunk_size)


def minillm_loss(
    student_logits: torch.Tensor,
    rollout,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    weight_single_step: bool = False,
    pt: tuple[torch.Tensor, dict[str, float]] | None = None,
    lm_coef: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    teacher_head: TeacherHead | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_pg + L_single + lm_coef * L_pt`` for one micro-batch (algorithm.md §4).

    Args:
        student_logits: ``[B, T, V]`` raw student logits at the response positions.
        rollout: a ``Rollout`` (its ``response_ids``, ``student_logprobs`` = old log-probs,
            ``response_mask`` and teacher distribution; without a teacher distribution, i.e.
            sampled with ``teacher_dist='none'``, the single-step term is skipped).
        advantages, weights: ``[B, T]`` from :func:`compute_advantages` / :func:`importance_weights`.
        temperature, top_k, top_p: the sampling processing, so the PPO ratio is 1 at epoch one.
        weight_single_step: the paper's variant (weight the single-step KL by ``w``).
        pt: ``(loss, stats)`` of :func:`pt_loss` on a pre-training batch, or None.
        teacher_head: the frozen teacher LM head, needed when the rollout carries the teacher's
            hidden states (``teacher_dist='hidden'``).

    Returns:
        ``(total, stats)`` with stats prefixed ``pg/``, ``single/``, ``pt/`` and ``loss``.
    """
    logprobs = token_logprobs(student_logits, rollout.response_ids, temperature, top_k, top_p, chunk_size)
    total, pg_stats = policy_loss(
        logprobs, rollout.student_logprobs, weights, advantages, rollout.response_mask, clip_eps
    )
    parts = {"pg": pg_stats}
    teacher = rollout
    teacher_hidden = getattr(rollout, "teacher_hidden", None)
    if teacher_hidden is not None:
        if teacher_head is None:
            raise ValueError("minillm_loss: the rollout carries the teacher's hidden states (teacher_dist='hidden'); "
                             "pass teacher_head")
        teacher = HiddenTeacher(teacher_hidden, teacher_head)
    if teacher is not rollout or rollout.teacher_dist_logprobs is not None or rollout.teacher_topk_logprobs is not None:
        single, parts["single"] = single_step_loss(
            student_logits, teacher, rollout.response_mask, weights if weight_single_step else None, chunk_size
        )
        total = total + single
    if pt is not None:
        total = total + lm_coef * pt[0]
        parts["pt"] = pt[1]
    stats = {f"{prefix}/{key}": value for prefix, part in parts.items() for key, value in part.items()}
    stats["loss"] = total.item()
    return total, stats
