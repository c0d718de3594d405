"""Per-position full-vocabulary functions of logits, chunked, with closed-form gradients.

Each is a ``torch.autograd.Function`` that never builds more ``[B, T, V]`` float tensors than the
gradient itself: the forward walks over blocks of at most ``chunk_size`` positions and saves only
its inputs (the model keeps the logits alive anyway); the backward recomputes each block's softmax
and writes the closed-form gradient:

- ``d log q(y) / dz = onehot(y) - q``                        (:func:`token_logprobs`)
- ``d KL(q || p) / dz = q * ((log q - log p) - KL)``          (:func:`reverse_kl_to_teacher`)
- ``d (-sum_v p log q) / dz = q * sum(p) - p``               (:func:`soft_cross_entropy`)

Blocks are slices ``logits[b0:b1, t0:t1]`` of the caller's tensor, so the (usually strided)
response slice of the model's logits is never copied as a whole. The losses built on these are in
:mod:`minillm_rl.algorithm.losses`.

The teacher comes in three forms: dense ``[B, T, V]`` log-probs, top-K log-probs and ids, or
(``hidden`` mode) its final hidden states ``[B, T, d]`` and frozen LM head, applied here in
vocabulary chunks (:func:`reverse_kl_to_teacher_hidden`, :func:`soft_cross_entropy_hidden`). The
module is longer than ~400 lines because every full-vocabulary kernel shares the block walk, the
entry checks and the chunk-size policy defined here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from minillm_rl.algorithm.logits import process_logits
from minillm_rl.algorithm.teacher_head import HiddenTeacher, TeacherHead

__all__ = [
    "check_aligned",
    "check_logits",
    "default_chunk_size",
    "default_hidden_chunks",
    "reverse_kl_to_teacher",
    "reverse_kl_to_teacher_hidden",
    "reverse_kl_to_teacher_topk",
    "soft_cross_entropy",
    "soft_cross_entropy_hidden",
    "soft_cross_entropy_topk",
    "token_logprobs",
]

# chunk_size=None picks the block size per device: on a GPU large blocks amortise kernel launches;
# on a CPU a block of ~2^20 elements (4 MB of float32) keeps a full-vocabulary row's temporaries in
# cache, which measured 2x faster than 1024-position blocks for V = 49k (bench/bench_runtime.py).
DEFAULT_CHUNK_SIZE = None
GPU_CHUNK_POSITIONS = 1024
CPU_CHUNK_ELEMENTS = 2**20
# Resolution of a tail mass 1 - sum(exp(top-K float32 log-probs)): below it the shipped values
# cannot tell the tail's size, and a rounded-to-zero tail would make the KL infinite.
_MIN_TAIL_MASS = torch.finfo(torch.float32).eps
# Hidden-teacher kernels: blocks of positions times chunks of the head's vocabulary rows. Every
# block streams the whole V x d head once, so blocks hold many positions; the chunk bounds the
# [positions, chunk] temporaries (CPU: 2^20 elements, as above).
HIDDEN_VOCAB_CHUNK = 4096


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


def _vocab_chunks(vocab: int, chunk: int) -> Iterator[slice]:
    for start in range(0, vocab, chunk):
        yield slice(start, min(start + chunk, vocab))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit and float32 inputs; float64 stays float64 (the tests' references)."""
    return torch.promote_types(dtype, torch.float32)


def _student_logsumexp(block: torch.Tensor, chunks: list[slice], compute: torch.dtype) -> torch.Tensor:
    """``logsumexp`` over the vocabulary of ``block [b, t, V]`` -> ``[b * t]``, chunk by chunk."""
    parts = [torch.logsumexp(block[..., cols].to(compute), dim=-1).flatten() for cols in chunks]
    return torch.stack(parts).logsumexp(dim=0)


class _HiddenReverseKLKernel:
    """``KL(q || p)`` with ``p = softmax(head(h))``, one vocabulary chunk at a time.

    ``KL = sum_v q_v (s_v - t_v) - lse(s) + lse(t)`` (``s``, ``t``: student and teacher logits), so
    one pass over the chunks gives it once the student's ``lse(s)`` is known; the backward's
    ``q_v * (log q_v - log p_v - KL)`` needs ``lse(s)``, ``lse(t)`` and ``KL``: the saved state.
    """

    state_width = 3

    @staticmethod
    def value(block, hidden, head: TeacherHead, chunks, compute):
        student_lse = _student_logsumexp(block, chunks, compute)
        teacher_lse = torch.full_like(student_lse, float("-inf"))
        cross = torch.zeros_like(student_lse)
        for cols in chunks:
            student = block[..., cols].reshape(-1, cols.stop - cols.start).to(compute)
            teacher = head.logits(hidden, cols)
            cross += (torch.exp(student - student_lse[:, None]) * (student - teacher)).sum(-1)
            teacher_lse = torch.logaddexp(teacher_lse, torch.logsumexp(teacher, dim=-1))
        kl = cross - student_lse + teacher_lse
        return kl, torch.stack([student_lse, teacher_lse, kl], dim=-1)

    @staticmethod
    def grad(grad_out, block, hidden, head: TeacherHead, chunks, compute, state):
        student_lse, teacher_lse, kl = (column[:, None] for column in state.unbind(-1))
        for cols in chunks:
            student_logprobs = block[..., cols].reshape(-1, cols.stop - cols.start).to(compute) - student_lse
            teacher_logprobs = head.logits(hidden, cols) - teacher_lse
            yield cols, student_logprobs.exp() * (student_logprobs - teacher_logprobs - kl) * grad_out[:, None]


class _HiddenSoftCrossEntropyKernel:
    """``-sum_v p_v log q_v = lse(s) - sum_v p_v s_v`` with ``p = softmax(head(h))``; the teacher's
    normaliser and ``sum_v p_v s_v`` are accumulated online (rescaled as the running max grows),
    so the head is applied once per chunk. Backward: ``q - p``; state ``lse(s)``, ``lse(t)``."""

    state_width = 2

    @staticmethod
    def value(block, hidden, head: TeacherHead, chunks, compute):
        student_lse = _student_logsumexp(block, chunks, compute)
        running_max = torch.full_like(student_lse, float("-inf"))
        normaliser = torch.zeros_like(student_lse)
        weighted = torch.zeros_like(student_lse)  # sum_v exp(t_v - running_max) s_v
        for cols in chunks:
            student = block[..., cols].reshape(-1, cols.stop - cols.start).to(compute)
            teacher = head.logits(hidden, cols)
            new_max = torch.maximum(running_max, teacher.max(dim=-1).values)
            rescale = torch.exp(running_max - new_max)
            unnormalised = torch.exp(teacher - new_max[:, None])
            normaliser = normaliser * rescale + unnormalised.sum(-1)
            weighted = weighted * rescale + (unnormalised * student).sum(-1)
            running_max = new_max
        teacher_lse = running_max + normaliser.log()
        return student_lse - weighted / normaliser, torch.stack([student_lse, teacher_lse], dim=-1)

    @staticmethod
    def grad(grad_out, block, hidden, head: TeacherHead, chunks, compute, state):
        student_lse, teacher_lse = (column[:, None] for column in state.unbind(-1))
        for cols in chunks:
            student = block[..., cols].reshape(-1, cols.stop - cols.start).to(compute)
            teacher_probs = torch.exp(head.logits(hidden, cols) - teacher_lse)
            yield cols, (torch.exp(student - student_lse) - teacher_probs) * grad_out[:, None]


class _HiddenTeacherFunction(torch.autograd.Function):
    """A hidden-teacher kernel over blocks of ``positions`` positions and ``vocab_chunk`` vocabulary
    columns: no tensor larger than ``[positions, vocab_chunk]`` besides the gradient itself.

    ``logits [B, T, V]`` is the only differentiable input; ``hidden [B, T, d]`` and the head
    (``weight [V, d]``, ``bias [V]`` or None) are constants. The forward saves the kernel's
    per-position state (normalisers, the value) so the backward applies the head once per chunk.
    Values and state are float32 (float64 for float64 logits).
    """

    @staticmethod
    def forward(ctx, kernel, positions: int, vocab_chunk: int, logits: torch.Tensor, hidden: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        batch, length, vocab = logits.shape
        compute = _compute_dtype(logits.dtype)
        head = TeacherHead(weight, bias)
        chunks = list(_vocab_chunks(vocab, vocab_chunk))
        out = torch.zeros(batch, length, dtype=compute, device=logits.device)
        state = torch.zeros(batch, length, kernel.state_width, dtype=compute, device=logits.device)
        for bs, ts in _blocks(batch, length, positions):
            block_hidden = hidden[bs, ts].reshape(-1, hidden.shape[-1]).to(device=logits.device, dtype=compute)
            value, block_state = kernel.value(logits[bs, ts], block_hidden, head, chunks, compute)
            out[bs, ts] = value.view(out[bs, ts].shape)
            state[bs, ts] = block_state.view(state[bs, ts].shape)
        ctx.kernel, ctx.positions, ctx.chunks = kernel, positions, chunks
        ctx.save_for_backward(logits, hidden, weight, bias, state)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, hidden, weight, bias, state = ctx.saved_tensors
        batch, length, _ = logits.shape
        compute = state.dtype
        head = TeacherHead(weight, bias)
        grad_logits = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        for bs, ts in _blocks(batch, length, ctx.positions):
            block_hidden = hidden[bs, ts].reshape(-1, hidden.shape[-1]).to(device=logits.device, dtype=compute)
            block_grad = grad_out[bs, ts].reshape(-1).to(compute)
            target = grad_logits[bs, ts]
            for cols, grad in ctx.kernel.grad(block_grad, logits[bs, ts], block_hidden, head, ctx.chunks, compute,
                                              state[bs, ts].reshape(-1, state.shape[-1])):
                target[..., cols] = grad.view(*target.shape[:2], -1).to(logits.dtype)
        return None, None, None, grad_logits, None, None, None


def default_hidden_chunks(logits: torch.Tensor) -> tuple[int, int]:
    """``(positions per block, vocabulary columns per chunk)`` of the hidden-teacher kernels when
    ``chunk_size`` / ``vocab_chunk_size`` are ``None``: GPU 1024 positions x 4 * 4096 columns;
    CPU ``2^20 / 4096`` = 256 positions x 4096 columns."""
    if logits.device.type != "cpu":
        return GPU_CHUNK_POSITIONS, 4 * HIDDEN_VOCAB_CHUNK
    return max(1, CPU_CHUNK_ELEMENTS // HIDDEN_VOCAB_CHUNK), HIDDEN_VOCAB_CHUNK


def _apply_hidden(name: str, kernel, student_logits: torch.Tensor, teacher: HiddenTeacher,
                  chunk_size: int | None, vocab_chunk_size: int | None) -> torch.Tensor:
    """Checks and runs a kernel whose teacher is ``HiddenTeacher(hidden [B, T, d], head [V, d])``."""
    check_logits(name, student_logits)
    _check_chunk_size(name, chunk_size)
    _check_chunk_size(name, vocab_chunk_size)
    if not isinstance(teacher, HiddenTeacher):
        raise ValueError(f"{name}: teacher must be a HiddenTeacher(hidden, head), got {type(teacher).__name__}")
    head = teacher.head
    if head.vocab_size != student_logits.shape[-1]:
        raise ValueError(f"{name}: the teacher head has {head.vocab_size} vocabulary rows, the student logits "
                         f"{student_logits.shape[-1]}")
    check_aligned(name, "teacher hidden", teacher.hidden, (*student_logits.shape[:2], head.hidden_size))
    positions, vocab_chunk = default_hidden_chunks(student_logits)
    return _HiddenTeacherFunction.apply(kernel, chunk_size or positions, vocab_chunk_size or vocab_chunk,
                                        student_logits, teacher.hidden, head.weight, head.bias)


def check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"{name}: logits must be [batch, length, vocab], got shape {tuple(logits.shape)}")


def check_aligned(name: str, field: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
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


def _apply_dense(name: str, kernel, chunk_size: int | None, student_logits: torch.Tensor, field: str,
                 teacher: torch.Tensor) -> torch.Tensor:
    """Checks and runs a kernel whose teacher input is ``[B, T, V]`` like ``student_logits``."""
    check_logits(name, student_logits)
    check_aligned(name, field, teacher, student_logits.shape)
    _check_chunk_size(name, chunk_size)
    return _ChunkedLogitsFunction.apply(kernel, chunk_size, student_logits, teacher)


def _apply_topk(name: str, kernel, chunk_size: int | None, student_logits: torch.Tensor,
                teacher_topk_logprobs: torch.Tensor, teacher_topk_ids: torch.Tensor) -> torch.Tensor:
    """Checks and runs a kernel whose teacher input is ``[B, T, K]`` top-K log-probs and ids."""
    check_logits(name, student_logits)
    _check_chunk_size(name, chunk_size)
    if teacher_topk_logprobs.dim() != 3 or teacher_topk_logprobs.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"{name}: teacher_topk_logprobs must be [batch, length, K] with batch, length = "
            f"{tuple(student_logits.shape[:2])}, got {tuple(teacher_topk_logprobs.shape)}"
        )
    check_aligned(name, "teacher_topk_ids", teacher_topk_ids, teacher_topk_logprobs.shape)
    return _ChunkedLogitsFunction.apply(kernel, chunk_size, student_logits, teacher_topk_logprobs,
                                        teacher_topk_ids.long())


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
        temperature, top_k, top_p: the sampler's processing (:func:`minillm_rl.algorithm.logits.process_logits`);
            a token filtered out by top-k/top-p gets ``-inf``.

    Returns:
        ``[B, T]`` float32 log-probs.
    """
    check_logits("token_logprobs", logits)
    check_aligned("token_logprobs", "token_ids", token_ids, logits.shape[:2])
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
    return _apply_dense("reverse_kl_to_teacher", _ReverseKLKernel(), chunk_size, student_logits,
                        "teacher_dist_logprobs", teacher_dist_logprobs)


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
    return _apply_topk("reverse_kl_to_teacher_topk", _TopKReverseKLKernel(), chunk_size, student_logits,
                       teacher_topk_logprobs, teacher_topk_ids)


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
    return _apply_dense("soft_cross_entropy", _SoftCrossEntropyKernel(), chunk_size, student_logits,
                        "teacher_logprobs", teacher_logprobs)


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
    return _apply_topk("soft_cross_entropy_topk", _TopKSoftCrossEntropyKernel(), chunk_size, student_logits,
                       teacher_topk_logprobs, teacher_topk_ids)


def reverse_kl_to_teacher_hidden(
    student_logits: torch.Tensor,
    teacher: HiddenTeacher,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`reverse_kl_to_teacher` with the teacher's distribution recomputed from its final
    hidden states and frozen LM head (``hidden`` mode): exact, never an ``[N, V]`` teacher tensor.

    Args:
        student_logits: ``[B, T, V]`` raw student logits.
        teacher: ``hidden [B, T, d]`` (any float dtype; computed in float32) and ``head`` (``[V, d]``).
        chunk_size: positions per block; ``vocab_chunk_size``: head rows per matmul (``None``: per
            device, :func:`default_hidden_chunks`).

    Returns:
        ``[B, T]`` float32 (float64 for float64 logits).
    """
    return _apply_hidden("reverse_kl_to_teacher_hidden", _HiddenReverseKLKernel(), student_logits, teacher,
                         chunk_size, vocab_chunk_size)


def soft_cross_entropy_hidden(
    student_logits: torch.Tensor,
    teacher: HiddenTeacher,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`soft_cross_entropy` with the teacher given as hidden states + LM head (see
    :func:`reverse_kl_to_teacher_hidden`). Returns ``[B, L]`` float32 (float64 for float64 logits)."""
    return _apply_hidden("soft_cross_entropy_hidden", _HiddenSoftCrossEntropyKernel(), student_logits, teacher,
                         chunk_size, vocab_chunk_size)
