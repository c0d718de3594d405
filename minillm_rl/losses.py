"""MiniLLM losses (algorithm.md §4-§5) as pure tensor functions.

Full-vocabulary terms are ``torch.autograd.Function``\\ s that never build more ``[B, T, V]``
float tensors than the gradient itself: the forward walks over blocks of at most ``chunk_size``
positions and saves only its inputs (the model keeps the logits alive anyway); the backward
recomputes each block's softmax and writes the closed-form gradient:

- ``d log q(y) / dz = onehot(y) - q``                        (:func:`token_logprobs`)
- ``d KL(q || p) / dz = q * ((log q - log p) - KL)``          (:func:`reverse_kl_to_teacher`)
- ``d (-sum_v p log q) / dz = q * sum(p) - p``               (:func:`soft_cross_entropy`)

Blocks are slices ``logits[b0:b1, t0:t1]`` of the caller's tensor, so the (usually strided)
response slice of the model's logits is never copied as a whole.

"Mean over valid tokens" is ``sum(x * mask) / sum(mask)`` (0 when nothing is valid). Stats are
plain floats for logging.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from minillm_rl.advantages import (  # re-exported: the learner imports everything from here
    AdvantageConfig,
    compute_advantages,
    importance_weights,
    masked_mean,
    reward_to_go,
    token_rewards,
    whiten,
)
from minillm_rl.logits import process_logits

__all__ = [
    "AdvantageConfig",
    "compute_advantages",
    "importance_weights",
    "kd_loss",
    "minillm_loss",
    "policy_loss",
    "pt_loss",
    "reverse_kl_to_teacher",
    "reverse_kl_to_teacher_topk",
    "reward_to_go",
    "sft_loss",
    "single_step_loss",
    "soft_cross_entropy",
    "token_logprobs",
    "token_rewards",
    "whiten",
]

# chunk_size=None picks the block size per device: on a GPU large blocks amortise kernel launches;
# on a CPU a block of ~2^20 elements (4 MB of float32) keeps a full-vocabulary row's temporaries in
# cache, which measured 2x faster than 1024-position blocks for V = 49k (bench/bench_runtime.py).
DEFAULT_CHUNK_SIZE = None
GPU_CHUNK_POSITIONS = 1024
CPU_CHUNK_ELEMENTS = 2**20
IGNORE_INDEX = -100
# Resolution of a tail mass 1 - sum(exp(top-K float32 log-probs)): below it the shipped values
# cannot tell the tail's size, and a rounded-to-zero tail would make the KL infinite.
_MIN_TAIL_MASS = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------
# Chunked full-vocabulary functions
# ---------------------------------------------------------------------------------------------


def _blocks(batch: int, length: int, chunk_size: int) -> Iterator[tuple[slice, slice]]:
    """``(batch slice, time slice)`` pairs covering ``[batch, length]``, each <= ``chunk_size`` positions."""
    if length >= chunk_size:
        for b in range(batch):
            for t in range(0, length, chunk_size):
                yield slice(b, b + 1), slice(t, min(t + chunk_size, length))
    elif length > 0:
        rows = chunk_size // length
        for b in range(0, batch, rows):
            yield slice(b, min(b + rows, batch)), slice(0, length)


class _ChunkedLogitsFunction(torch.autograd.Function):
    """``kernel.value`` per block in forward, ``kernel.grad`` per block in backward.

    ``logits`` ``[B, T, V]`` is the only differentiable input; ``others`` are ``[B, T, ...]``
    tensors aligned with it (token ids, teacher log-probs), which get no gradient.
    A kernel's ``value(logits [n, V], *others [n, ...]) -> [n]`` and
    ``grad(grad_out [n], logits [n, V], *others) -> [n, V]`` see flattened blocks.
    """

    @staticmethod
    def forward(ctx, kernel, chunk_size: int | None, logits: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        ctx.kernel, ctx.chunk_size = kernel, chunk_size or default_chunk_size(logits)
        chunk_size = ctx.chunk_size
        ctx.save_for_backward(logits, *others)
        batch, length, vocab = logits.shape
        out = torch.zeros(batch, length, dtype=torch.float32, device=logits.device)
        for bs, ts in _blocks(batch, length, chunk_size):
            block = [logits[bs, ts].reshape(-1, vocab)] + [o[bs, ts].flatten(0, 1) for o in others]
            out[bs, ts] = kernel.value(*block).view(out[bs, ts].shape)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, *others = ctx.saved_tensors
        batch, length, vocab = logits.shape
        grad_logits = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        for bs, ts in _blocks(batch, length, ctx.chunk_size):
            block = [logits[bs, ts].reshape(-1, vocab)] + [o[bs, ts].flatten(0, 1) for o in others]
            grad = ctx.kernel.grad(grad_out[bs, ts].reshape(-1).float(), *block)
            grad_logits[bs, ts] = grad.view(grad_logits[bs, ts].shape).to(logits.dtype)
        return (None, None, grad_logits) + (None,) * len(others)


def _where_positive(prob: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` where ``prob > 0`` else 0: the ``0 * log 0 = 0`` convention (avoids ``0 * inf``)."""
    return torch.where(prob > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))


@dataclass(frozen=True)
class _TokenLogprobKernel:
    """``log_softmax(process_logits(z))[y]``; the top-k/top-p masks are constants (0 gradient)."""

    temperature: float
    top_k: int
    top_p: float

    def _processed(self, logits: torch.Tensor) -> torch.Tensor:
        return process_logits(logits, self.temperature, self.top_k, self.top_p)

    def value(self, logits, token_ids):
        logprobs = torch.log_softmax(self._processed(logits), dim=-1)
        return logprobs.gather(-1, token_ids[:, None]).squeeze(-1)

    def grad(self, grad_out, logits, token_ids):
        processed = self._processed(logits)
        grad = torch.softmax(processed, dim=-1).mul_(-grad_out[:, None])
        grad.scatter_add_(-1, token_ids[:, None], grad_out[:, None])
        grad.masked_fill_(processed == float("-inf"), 0.0)
        return grad.div_(self.temperature)


def _reverse_kl_parts(logits: torch.Tensor, teacher_logprobs: torch.Tensor):
    """Student probs ``q``, ``log q - log p`` and ``KL(q || p)`` for ``[n, V]`` rows.

    The teacher is renormalised per row in float32, so a bf16-shipped distribution still gives
    ``KL >= 0``; raw teacher logits work as well.
    """
    student_logprobs = torch.log_softmax(logits.float(), dim=-1)
    student_probs = student_logprobs.exp()
    log_ratio = _where_positive(student_probs, student_logprobs - torch.log_softmax(teacher_logprobs.float(), dim=-1))
    return student_probs, log_ratio, (student_probs * log_ratio).sum(-1)


class _ReverseKLKernel:
    def value(self, logits, teacher_logprobs):
        return _reverse_kl_parts(logits, teacher_logprobs)[2]

    def grad(self, grad_out, logits, teacher_logprobs):
        student_probs, log_ratio, kl = _reverse_kl_parts(logits, teacher_logprobs)
        return student_probs * (log_ratio - kl[:, None]) * grad_out[:, None]


def _topk_reverse_kl_parts(logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor):
    """Student probs ``q`` ``[n, V]``, each token's bucket log-ratio ``[n, V]`` and the coarse KL ``[n]``.

    Buckets: each of the K teacher top tokens, plus one tail bucket with everything else. The
    KL between the coarsened distributions has the exact KL's gradient form with every token's
    ``log q - log p`` replaced by its bucket's.
    """
    student_logprobs = torch.log_softmax(logits.float(), dim=-1)
    student_probs = student_logprobs.exp()
    student_top = student_logprobs.gather(-1, topk_ids)
    student_tail = torch.logsumexp(student_logprobs.scatter(-1, topk_ids, float("-inf")), dim=-1)
    teacher_top = topk_logprobs.float()
    teacher_tail_mass = 1.0 - teacher_top.double().exp().sum(-1)
    teacher_tail = teacher_tail_mass.clamp(min=_MIN_TAIL_MASS).log().float()
    top_ratio = _where_positive(student_top.exp(), student_top - teacher_top)
    tail_ratio = _where_positive(student_tail.exp(), student_tail - teacher_tail)
    coarse_kl = (student_top.exp() * top_ratio).sum(-1) + student_tail.exp() * tail_ratio
    bucket_ratio = tail_ratio[:, None].expand_as(student_probs).scatter(-1, topk_ids, top_ratio)
    return student_probs, bucket_ratio, coarse_kl


class _TopKReverseKLKernel:
    def value(self, logits, topk_logprobs, topk_ids):
        return _topk_reverse_kl_parts(logits, topk_logprobs, topk_ids)[2]

    def grad(self, grad_out, logits, topk_logprobs, topk_ids):
        student_probs, bucket_ratio, coarse_kl = _topk_reverse_kl_parts(logits, topk_logprobs, topk_ids)
        return student_probs * (bucket_ratio - coarse_kl[:, None]) * grad_out[:, None]


class _TopKSoftCrossEntropyKernel:
    """``-sum_b P(b) log Q(b)`` over the buckets of :func:`_topk_reverse_kl_parts` (each teacher
    top-K token, and the tail): the soft cross-entropy of the coarsened distributions.

    ``d/dz_v = q_v (1 - P(b(v)) / Q(b(v)))`` since ``sum_b P(b) = 1``; a top token's bucket is
    itself, so there it is ``q_v - p_v``, as in the exact kernel.
    """

    @staticmethod
    def _parts(logits, topk_logprobs, topk_ids):
        student_logprobs = torch.log_softmax(logits.float(), dim=-1)
        student_top = student_logprobs.gather(-1, topk_ids)
        student_tail = torch.logsumexp(student_logprobs.scatter(-1, topk_ids, float("-inf")), dim=-1)
        teacher_top = topk_logprobs.float().exp()
        # A tail below the shipped values' resolution is rounding, not mass (see _MIN_TAIL_MASS).
        teacher_tail = 1.0 - teacher_top.double().sum(-1)
        teacher_tail = torch.where(teacher_tail > _MIN_TAIL_MASS, teacher_tail, 0.0).float()
        return student_logprobs, student_top, student_tail, teacher_top, teacher_tail

    def value(self, logits, topk_logprobs, topk_ids):
        _, student_top, student_tail, teacher_top, teacher_tail = self._parts(logits, topk_logprobs, topk_ids)
        return -(_where_positive(teacher_top, teacher_top * student_top).sum(-1)
                 + _where_positive(teacher_tail, teacher_tail * student_tail))

    def grad(self, grad_out, logits, topk_logprobs, topk_ids):
        student_logprobs, student_top, student_tail, teacher_top, teacher_tail = self._parts(
            logits, topk_logprobs, topk_ids)
        # P(b) / Q(b) per token: the tail's for every token, then each top token's own.
        ratio = _where_positive(teacher_tail, teacher_tail * torch.exp(-student_tail))[:, None].expand_as(
            student_logprobs)
        ratio = ratio.scatter(-1, topk_ids, teacher_top * torch.exp(-student_top))
        return student_logprobs.exp() * (1.0 - ratio) * grad_out[:, None]


class _SoftCrossEntropyKernel:
    """``-sum_v p(v) log q(v)`` with the teacher renormalised per row (log-probs or logits)."""

    @staticmethod
    def _probs(logits, teacher_logprobs):
        student_logprobs = torch.log_softmax(logits.float(), dim=-1)
        teacher_probs = torch.softmax(teacher_logprobs.float(), dim=-1)
        return student_logprobs, teacher_probs

    def value(self, logits, teacher_logprobs):
        student_logprobs, teacher_probs = self._probs(logits, teacher_logprobs)
        return -(_where_positive(teacher_probs, teacher_probs * student_logprobs)).sum(-1)

    def grad(self, grad_out, logits, teacher_logprobs):
        student_logprobs, teacher_probs = self._probs(logits, teacher_logprobs)
        # sum(p) = 1 after renormalisation, so q * sum(p) - p is q - p.
        return (student_logprobs.exp() - teacher_probs) * grad_out[:, None]


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"{name}: logits must be [batch, length, vocab], got shape {tuple(logits.shape)}")


def _check_aligned(name: str, field: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: {field} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def default_chunk_size(logits: torch.Tensor) -> int:
    """Positions per block when ``chunk_size`` is ``None`` (see :data:`DEFAULT_CHUNK_SIZE`)."""
    if logits.device.type != "cpu":
        return GPU_CHUNK_POSITIONS
    return max(1, CPU_CHUNK_ELEMENTS // logits.shape[-1])


def _check_chunk_size(name: str, chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be >= 1 or None (per device), got {chunk_size}")


def token_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``log_softmax(process_logits(logits))[token]``, differentiable in ``logits``.

    Args:
        logits: ``[B, T, V]`` raw logits (row ``t`` predicts ``token_ids[:, t]``).
        token_ids: ``[B, T]`` long, in ``[0, V)``.
        temperature, top_k, top_p: the sampler's processing (:func:`minillm_rl.logits.process_logits`);
            a token filtered out by top-k/top-p gets ``-inf``.

    Returns:
        ``[B, T]`` float32 log-probs.
    """
    _check_logits("token_logprobs", logits)
    _check_aligned("token_logprobs", "token_ids", token_ids, logits.shape[:2])
    _check_chunk_size("token_logprobs", chunk_size)
    vocab = logits.shape[-1]
    if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= vocab):
        raise ValueError(
            f"token_logprobs: token_ids must be in [0, {vocab}), got range "
            f"[{token_ids.min().item()}, {token_ids.max().item()}]"
        )
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    kernel = _TokenLogprobKernel(float(temperature), int(top_k), float(top_p))
    return _ChunkedLogitsFunction.apply(kernel, chunk_size, logits, token_ids.long())


def reverse_kl_to_teacher(
    student_logits: torch.Tensor, teacher_dist_logprobs: torch.Tensor, chunk_size: int | None = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """``KL(q || p)`` per position over the whole vocabulary; gradient through the student only.

    Args:
        student_logits: ``[B, T, V]`` raw student logits (temperature 1, full vocab).
        teacher_dist_logprobs: ``[B, T, V]`` teacher log-distribution (float32 or bf16).

    Returns:
        ``[B, T]`` float32.
    """
    _check_logits("reverse_kl_to_teacher", student_logits)
    _check_aligned("reverse_kl_to_teacher", "teacher_dist_logprobs", teacher_dist_logprobs, student_logits.shape)
    _check_chunk_size("reverse_kl_to_teacher", chunk_size)
    return _ChunkedLogitsFunction.apply(_ReverseKLKernel(), chunk_size, student_logits, teacher_dist_logprobs)


def reverse_kl_to_teacher_topk(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Approximate ``KL(q || p)`` from the teacher's top-K log-probs.

    Both distributions are coarsened to K+1 buckets (the teacher's top-K tokens, one tail bucket
    holding ``1 - sum(top-K)``) and the KL of the coarse distributions is returned. By the
    data-processing inequality this is a lower bound on the exact KL, equal to it when K = V; the
    gradient pushes the student's tail mass, not its shape inside the tail. The teacher's tail
    mass is floored at float32 epsilon (the resolution of the shipped log-probs).

    Measured (tests/test_losses.py, V = 256, peaked synthetic teacher): the mean relative
    shortfall vs the exact KL is 0.65 / 0.31 / 0.07 for K = 1 / 4 / 16 when the student is near
    the teacher, 0.86 / 0.74 / 0.55 for an unrelated student. Prefer exact mode unless the
    ``[B, T, V]`` teacher tensor does not fit; then use a K that covers the teacher's mass.

    Args:
        student_logits: ``[B, T, V]`` raw student logits.
        teacher_topk_logprobs: ``[B, T, K]`` teacher log-probs (temperature 1, full vocab).
        teacher_topk_ids: ``[B, T, K]`` long, distinct ids per position.

    Returns:
        ``[B, T]`` float32.
    """
    name = "reverse_kl_to_teacher_topk"
    _check_logits(name, student_logits)
    _check_chunk_size(name, chunk_size)
    if teacher_topk_logprobs.dim() != 3 or teacher_topk_logprobs.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"{name}: teacher_topk_logprobs must be [batch, length, K] with batch, length = "
            f"{tuple(student_logits.shape[:2])}, got {tuple(teacher_topk_logprobs.shape)}"
        )
    _check_aligned(name, "teacher_topk_ids", teacher_topk_ids, teacher_topk_logprobs.shape)
    return _ChunkedLogitsFunction.apply(
        _TopKReverseKLKernel(), chunk_size, student_logits, teacher_topk_logprobs, teacher_topk_ids.long()
    )


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, chunk_size: int | None = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """``-sum_v p(v) log q(v)`` per position; gradient through the student only.

    Args:
        student_logits: ``[B, L, V]``.
        teacher_logprobs: ``[B, L, V]`` teacher log-probs or logits (renormalised per position).

    Returns:
        ``[B, L]`` float32.
    """
    _check_logits("soft_cross_entropy", student_logits)
    _check_aligned("soft_cross_entropy", "teacher_logprobs", teacher_logprobs, student_logits.shape)
    _check_chunk_size("soft_cross_entropy", chunk_size)
    return _ChunkedLogitsFunction.apply(_SoftCrossEntropyKernel(), chunk_size, student_logits, teacher_logprobs)


def soft_cross_entropy_topk(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """:func:`soft_cross_entropy` from the teacher's top-K log-probs plus its tail mass: the
    cross-entropy between the coarsened distributions (each top token, and one tail bucket).
    Equal to the exact value when K covers the vocabulary.

    Args:
        student_logits: ``[B, L, V]``.
        teacher_topk_logprobs: ``[B, L, K]`` normalised teacher log-probs of ``teacher_topk_ids``.
        teacher_topk_ids: ``[B, L, K]`` distinct token ids per position.

    Returns:
        ``[B, L]`` float32.
    """
    _check_logits("soft_cross_entropy_topk", student_logits)
    _check_chunk_size("soft_cross_entropy_topk", chunk_size)
    _check_aligned("soft_cross_entropy_topk", "teacher_topk_logprobs", teacher_topk_logprobs,
                   (*student_logits.shape[:2], teacher_topk_logprobs.shape[-1]))
    _check_aligned("soft_cross_entropy_topk", "teacher_topk_ids", teacher_topk_ids, teacher_topk_logprobs.shape)
    return _ChunkedLogitsFunction.apply(_TopKSoftCrossEntropyKernel(), chunk_size, student_logits,
                                        teacher_topk_logprobs, teacher_topk_ids.long())


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


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
        _check_aligned("policy_loss", field, tensor, logprobs.shape)
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


TeacherDist = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _per_position_reverse_kl(student_logits: torch.Tensor, teacher, chunk_size: int | None) -> torch.Tensor:
    """Dispatch on the teacher form: dense ``[B,T,V]``, ``(topk_logprobs, topk_ids)``, or a rollout."""
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
            (approximate, see :func:`reverse_kl_to_teacher_topk`), or a ``Rollout`` carrying either.
        response_mask: ``[B, T]``.
        weights: ``None`` (reference: unweighted) or ``[B, T]`` importance weights (paper variant).

    Returns:
        ``(loss, stats)``; stats: ``loss`` and ``kl`` (the unweighted mean KL).
    """
    _check_aligned("single_step_loss", "response_mask", response_mask, student_logits.shape[:2])
    kl = _per_position_reverse_kl(student_logits, teacher, chunk_size)
    if weights is None:
        loss = masked_mean(kl, response_mask)
    else:
        _check_aligned("single_step_loss", "weights", weights, kl.shape)
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
    _check_logits("sft_loss", student_logits)
    _check_aligned("sft_loss", "labels", labels, student_logits.shape[:2])
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

    Returns:
        ``(loss, stats)``; stats: ``loss``, ``ce``, ``tokens`` and, with a teacher, ``soft_ce``.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"pt_loss: kd_ratio must be in [0, 1], got {kd_ratio}")
    if teacher_logprobs is not None and teacher_topk is not None:
        raise ValueError("pt_loss: pass teacher_logprobs or teacher_topk, not both")
    ce, stats = sft_loss(student_logits, labels, chunk_size)
    stats = {"ce": stats["loss"], "tokens": stats["tokens"]}
    if teacher_logprobs is None and teacher_topk is None:
        loss = ce
    else:
        per_position = soft_cross_entropy(student_logits, teacher_logprobs, chunk_size) if teacher_topk is None \
            else soft_cross_entropy_topk(student_logits, *teacher_topk, chunk_size)
        soft_ce = masked_mean(per_position, labels != IGNORE_INDEX)
        loss = (1.0 - kd_ratio) * ce + kd_ratio * soft_ce
        stats["soft_ce"] = soft_ce.item()
    stats["loss"] = loss.item()
    return loss, stats


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits_or_logprobs: torch.Tensor,
    labels: torch.Tensor,
    kd_ratio: float = 0.5,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Word-level KD baseline (algorithm.md §5) on ground-truth responses: :func:`pt_loss` with a teacher."""
    return pt_loss(student_logits, labels, teacher_logits_or_logprobs, kd_ratio, chunk_size)


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

    Returns:
        ``(total, stats)`` with stats prefixed ``pg/``, ``single/``, ``pt/`` and ``loss``.
    """
    logprobs = token_logprobs(student_logits, rollout.response_ids, temperature, top_k, top_p, chunk_size)
    total, pg_stats = policy_loss(
        logprobs, rollout.student_logprobs, weights, advantages, rollout.response_mask, clip_eps
    )
    parts = {"pg": pg_stats}
    if rollout.teacher_dist_logprobs is not None or rollout.teacher_topk_logprobs is not None:
        single, parts["single"] = single_step_loss(
            student_logits, rollout, rollout.response_mask, weights if weight_single_step else None, chunk_size
        )
        total = total + single
    if pt is not None:
        total = total + lm_coef * pt[0]
        parts["pt"] = pt[1]
    stats = {f"{prefix}/{key}": value for prefix, part in parts.items() for key, value in part.items()}
    stats["loss"] = total.item()
    return total, stats
