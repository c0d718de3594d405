"""Teacher-mixed sampling (algorithm.md §3.2-3.3): pure torch, any HF causal LM pair.

Each token is drawn from ``p~ = alpha * p + (1 - alpha) * q_old`` (both models' logits through
the same ``process_logits``) and everything the learner needs is recorded, so the learner never
runs the teacher. ``SamplingConfig.mixing`` says how: ``lazy`` (default) draws a shared coin per
step and runs only the model the token is drawn from, each model scoring the positions it skipped
in one KV-cached forward when it next runs or at the end (:mod:`~minillm_rl.algorithm.cached_lm`):
about ``alpha T + 1`` teacher forwards per ``T``-token response instead of ``T``; ``every_step``
runs both models at every step and draws from ``p~`` itself. With ``alpha == 0`` both are "the
student decodes, the teacher scores the finished responses in one forward". The records are the
same in meaning either way.

Longer than ~400 lines because the decode loop and the records it fills are one contract (the
``Rollout``) and are read together; the cached forwards live in ``cached_lm.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch

from minillm_rl.algorithm.cached_lm import CachedLM, mixture_coins
from minillm_rl.algorithm.forward import position_ids_from_mask
from minillm_rl.algorithm.logits import process_logits
from minillm_rl.tensor_pickle import TensorsAsArrays
from minillm_rl.tracking import StageClock


@dataclass
class SamplingConfig:
    """How rollouts are sampled and what teacher distribution is shipped with them.

    ``teacher_dist``: ``"exact"`` ships the teacher's full next-token log-distribution
    ``[B, T, V]`` in ``teacher_dist_dtype``; ``"hidden"`` ships the teacher's final hidden states
    ``[B, T, d]`` (the input of its LM head) in ``teacher_dist_dtype``, from which the learner
    recomputes the same distribution with the head (exact, ``V / d`` times fewer bytes; refused
    for a teacher whose logits are not its linear head's output); ``"topk"`` ships its
    ``teacher_topk`` largest log-probs and their ids; ``"none"`` ships neither (no single-step term).

    ``mixing``: ``"lazy"`` draws a shared ``Bernoulli(alpha)`` coin per step and runs only the
    model the token is drawn from (the other catches up later in one forward); ``"every_step"``
    runs both models at every step. Same distribution and records; lazy runs fewer forwards.
    """

    alpha: float = 0.2
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    teacher_dist: Literal["exact", "hidden", "topk", "none"] = "exact"
    teacher_topk: int = 64
    teacher_dist_dtype: torch.dtype = torch.float32
    # False: every response runs to max_new_tokens (EOS is sampled like any token); for benchmarks
    # that need equal lengths across systems.
    stop_at_eos: bool = True
    mixing: Literal["lazy", "every_step"] = "lazy"

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SamplingConfig.alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.teacher_dist not in ("exact", "hidden", "topk", "none"):
            raise ValueError(
                f"SamplingConfig.teacher_dist must be 'exact', 'hidden', 'topk' or 'none', got {self.teacher_dist!r}"
            )
        if self.mixing not in ("lazy", "every_step"):
            raise ValueError(f"SamplingConfig.mixing must be 'lazy' or 'every_step', got {self.mixing!r}")
        if self.teacher_topk < 1:
            raise ValueError(f"SamplingConfig.teacher_topk must be >= 1, got {self.teacher_topk}")
        if not (isinstance(self.teacher_dist_dtype, torch.dtype) and self.teacher_dist_dtype.is_floating_point):
            raise ValueError(
                f"SamplingConfig.teacher_dist_dtype must be a floating torch.dtype, got {self.teacher_dist_dtype!r}"
            )

    @property
    def processes_logits(self) -> bool:
        """Whether temperature/top-k/top-p change the distribution at all."""
        return self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0


@dataclass
class Rollout(TensorsAsArrays):
    """One batch of rollouts; the data contract between sampler and learner (see common.md).

    ``B`` batch, ``P`` padded prompt width, ``T`` response width, ``V`` vocab, ``K`` top-K,
    ``d`` the teacher's LM-head input width. All per-token values are 0 where ``response_mask`` is 0.
    Pickled with its tensors as raw bytes (:mod:`minillm_rl.tensor_pickle`): Ray ships it from
    worker to replay store to learner.
    """

    prompt_ids: torch.Tensor  # [B, P] long, left-padded
    prompt_mask: torch.Tensor  # [B, P] long, 1 = real token
    response_ids: torch.Tensor  # [B, T] long, pad after the first EOS
    response_mask: torch.Tensor  # [B, T] float32, 1 through the first EOS
    student_logprobs: torch.Tensor  # [B, T] float32, processed log q_old(y_t)
    teacher_logprobs: torch.Tensor  # [B, T] float32, processed log p(y_t)
    mixture_logprobs: torch.Tensor  # [B, T] float32, processed log p~(y_t)
    teacher_logprobs_raw: torch.Tensor  # [B, T] float32, log p(y_t) at temperature 1, full vocab
    teacher_dist_logprobs: torch.Tensor | None  # [B, T, V] raw teacher log-distribution (exact mode)
    teacher_topk_logprobs: torch.Tensor | None  # [B, T, K] float32 (top-K mode)
    teacher_topk_ids: torch.Tensor | None  # [B, T, K] long (top-K mode)
    alpha: float
    policy_version: int
    teacher_hidden: torch.Tensor | None = None  # [B, T, d] teacher final hidden states (hidden mode)
    # [B, T] long: the student weight version behind each token's student log-prob, read from the
    # sampler's caller after the student forward that scored it (a weight sync landing
    # mid-generation shows).
    token_policy_versions: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with every tensor moved to ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return Rollout(**moved)


def mixture_logprob(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``log(alpha * p + (1 - alpha) * q)`` from log-probs, elementwise, without leaving log space."""
    log_alpha = math.log(alpha) if alpha > 0 else float("-inf")
    log_one_minus_alpha = math.log1p(-alpha) if alpha < 1 else float("-inf")
    return torch.logaddexp(teacher_logprobs + log_alpha, student_logprobs + log_one_minus_alpha)


def processed_logprobs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """``[..., V]`` float32 log-distribution after temperature/top-k/top-p."""
    return torch.log_softmax(process_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p), dim=-1)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` ``[B, V]`` (unnormalised, non-negative) by inverting the CDF.

    ``torch.multinomial`` draws ``V`` exponentials per row (for a 49k vocabulary that was a fifth
    of a decode step on CPU); this draws one uniform per row. The CDF is accumulated in float64,
    and ``right=True`` returns the first index whose CDF exceeds ``u * total``, so a token of
    probability 0 is never drawn (except if ``u * total`` rounds up to ``total``, a ~2^-53
    event, where the index is clamped to the last token). Returns ``[B]`` long.
    """
    cdf = probs.double().cumsum(-1)
    uniform = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    return torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@dataclass
class _TeacherRecords:
    """Teacher-side records for a set of positions (shapes ``[...]`` or ``[..., K|V]``)."""

    logprobs: torch.Tensor
    logprobs_raw: torch.Tensor
    dist_logprobs: torch.Tensor | None
    topk_logprobs: torch.Tensor | None
    topk_ids: torch.Tensor | None
    hidden: torch.Tensor | None = None


def _teacher_records(
    teacher_logits: torch.Tensor, teacher_logprobs_all: torch.Tensor, tokens: torch.Tensor, cfg: SamplingConfig,
    teacher_hidden: torch.Tensor | None = None,
) -> _TeacherRecords:
    """Teacher records at the sampled ``tokens``.

    Args:
        teacher_logits: ``[..., V]`` raw logits.
        teacher_logprobs_all: ``[..., V]`` processed log-distribution (from :func:`processed_logprobs`).
        tokens: ``[...]`` sampled ids.
        teacher_hidden: ``[..., d]`` the LM head's input that gave ``teacher_logits`` (hidden mode).
    """
    index = tokens.unsqueeze(-1)
    raw_all = torch.log_softmax(teacher_logits.float(), dim=-1) if cfg.processes_logits else teacher_logprobs_all
    dist = topk_values = topk_ids = None
    if cfg.teacher_dist == "exact":
        dist = raw_all.to(cfg.teacher_dist_dtype)
    elif cfg.teacher_dist == "topk":
        topk_values, topk_ids = torch.topk(raw_all, min(cfg.teacher_topk, raw_all.shape[-1]), dim=-1)
    return _TeacherRecords(
        logprobs=teacher_logprobs_all.gather(-1, index).squeeze(-1),
        logprobs_raw=raw_all.gather(-1, index).squeeze(-1),
        dist_logprobs=dist,
        topk_logprobs=topk_values,
        topk_ids=topk_ids,
        hidden=teacher_hidden.to(cfg.teacher_dist_dtype) if cfg.teacher_dist == "hidden" else None,
    )


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    if eos_token_id is None:
        ids = []
    elif isinstance(eos_token_id, int):
        ids = [eos_token_id]
    else:
        ids = list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def _check_vocab(student, teacher) -> int:
    """Shared vocab size; compares the LM heads' output size (some models pad the embeddings)."""
    student_vocab = student.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"teacher and student must share the vocabulary: teacher has {teacher_vocab} logits, "
            f"student {student_vocab}"
        )
    return student_vocab


@torch.no_grad()
def sample_rollouts(
    student,
    teacher,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cfg: SamplingConfig,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    policy_version: int | Callable[[], int] = 0,
    timings: dict[str, float] | None = None,
    forward_calls: dict[str, int] | None = None,
) -> Rollout:
    """Sample one response per prompt from the teacher-mixed distribution and record it.

    Args:
        student, teacher: HF causal LMs sharing the tokenizer (same logit width).
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts.
        cfg: sampling settings (``cfg.mixing`` picks lazy or every-step mixing).
        eos_token_id: id or ids that end a response (the first one is part of it); ``None`` or
            ``[]`` never stops early.
        pad_token_id: written after a response's end.
        generator: RNG of the coins and of :func:`sample_categorical` (on the models' device);
            the same state gives the same rollout.
        policy_version: the student weight version, or a callable returning the version the
            student holds now, read after each student forward (``token_policy_versions``: the
            version behind each token's student log-prob); ``Rollout.policy_version`` is the first.
        timings: when given, seconds are added to ``"decode"`` (the student's forwards and the
            sampling) and ``"teacher"`` (the teacher's forwards and records).
        forward_calls: when given, each model's forwards are added to ``"student"`` and ``"teacher"``.

    Returns:
        A :class:`Rollout` whose width ``T`` is the longest response in the batch.
    """
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be [batch, prompt_len]; got {tuple(prompt_ids.shape)} "
            f"and {tuple(prompt_mask.shape)}"
        )
    if prompt_ids.shape[1] == 0 or bool((prompt_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded and non-empty (prompt_mask[:, -1] must be 1)")
    _check_vocab(student, teacher)
    if not cfg.stop_at_eos:
        eos_token_id = []
    device = prompt_ids.device
    clock = StageClock(timings, sync=(lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None)
    read_version = policy_version if callable(policy_version) else lambda: policy_version
    with clock.measure("decode"):
        student_lp, tokens, response_mask, teacher_rec, versions, calls = _decode(
            student, teacher, prompt_ids, prompt_mask, cfg, eos_token_id, pad_token_id, generator, read_version,
            clock,
        )
    if forward_calls is not None:
        for name, count in calls.items():
            forward_calls[name] = forward_calls.get(name, 0) + count
    # Zero everything past each response's end (contract); in exact mode only those rows are touched.
    invalid = response_mask == 0
    per_token = {
        "student_logprobs": student_lp,
        "teacher_logprobs": teacher_rec.logprobs,
        "mixture_logprobs": mixture_logprob(teacher_rec.logprobs, student_lp, cfg.alpha),
        "teacher_logprobs_raw": teacher_rec.logprobs_raw,
    }
    for values in list(per_token.values()) + [teacher_rec.dist_logprobs, teacher_rec.topk_logprobs,
                                              teacher_rec.hidden]:
        if values is not None:
            values[invalid] = 0
    if teacher_rec.topk_ids is not None:
        teacher_rec.topk_ids[invalid] = 0
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask.long(),
        response_ids=tokens,
        response_mask=response_mask,
        **per_token,
        teacher_dist_logprobs=teacher_rec.dist_logprobs,
        teacher_topk_logprobs=teacher_rec.topk_logprobs,
        teacher_topk_ids=teacher_rec.topk_ids,
        alpha=float(cfg.alpha),
        policy_version=int(versions[0, 0]),
        teacher_hidden=teacher_rec.hidden,
        token_policy_versions=torch.where(invalid, 0, versions.expand_as(tokens)),
    )


def _decode(student, teacher, prompt_ids, prompt_mask, cfg, eos_token_id, pad_token_id, generator, read_version,
            clock):
    """Token-by-token sampling; each model runs where the schedule needs it and catches up at the end.

    ``every_step``: the student runs at every step and, when ``alpha > 0``, the teacher too, and
    the token is drawn from ``p~`` itself. ``lazy``: a shared coin per step (:func:`mixture_coins`)
    says which model the token is drawn from, and only that model runs at that step (over every
    position it has not seen, :class:`CachedLM`). Either way each model then scores the positions
    it has not (one forward), so every position gets both models' records; at ``alpha = 0`` both
    schedules are "the student decodes, the teacher scores once".

    Returns ``student_logprobs [B, T]``, ``tokens [B, T]``, ``response_mask [B, T]``, the
    :class:`_TeacherRecords` with ``[B, T(, K|V|d)]`` tensors, ``versions [1, T]`` long
    (``read_version()`` after the student forward that scored each position) and the forward
    calls ``{"student": n, "teacher": m}``.
    """
    batch, prompt_len = prompt_ids.shape
    max_new, device = cfg.max_new_tokens, prompt_ids.device
    eos_ids = _eos_tensor(eos_token_id, device)
    coins = mixture_coins(cfg.alpha, max_new, generator, device) if cfg.mixing == "lazy" else None

    attention_mask = torch.ones(batch, prompt_len + max_new, dtype=torch.long, device=device)
    attention_mask[:, :prompt_len] = prompt_mask
    prompt_positions = position_ids_from_mask(prompt_mask)
    models = {
        "student": CachedLM(student, prompt_ids, attention_mask, prompt_positions),
        "teacher": CachedLM(teacher, prompt_ids, attention_mask, prompt_positions,
                            record_hidden=cfg.teacher_dist == "hidden"),
    }

    # Buffers are filled a few columns at a time; torch.empty leaves untouched pages unallocated,
    # so the [B, max_new, V] exact buffer only costs memory for the steps actually taken.
    tokens = torch.full((batch, max_new), pad_token_id, dtype=torch.long, device=device)
    response_mask = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
    records = _Records(cfg, batch, max_new, device, read_version)

    def advance(name: str, to: int) -> _Scored:
        with clock.measure("teacher") if name == "teacher" else contextlib.nullcontext():
            start = models[name].ready
            logits, hidden = models[name].advance(to, tokens)
            return _Scored(name, start, logits, processed_logprobs(logits, cfg), hidden)

    def record(scored: _Scored) -> None:
        with clock.measure("teacher") if scored.name == "teacher" else contextlib.nullcontext():
            records.write(scored, tokens)

    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new):
        if coins is not None:
            scored = [advance("teacher" if coins[step] else "student", step)]
            probs = scored[0].processed[:, -1].exp()
        else:
            scored = [advance("student", step)]
            probs = scored[0].processed[:, -1].exp()
            if cfg.alpha > 0:
                scored.append(advance("teacher", step))
                probs.lerp_(scored[1].processed[:, -1].exp(), cfg.alpha)
        sampled = sample_categorical(probs, generator)
        sampled.masked_fill_(finished, pad_token_id)
        tokens[:, step] = sampled
        response_mask[:, step] = (~finished).float()
        for item in scored:
            record(item)
        finished |= torch.isin(sampled, eos_ids)
        steps = step + 1
        if bool(finished.all()):
            break
    for name in models:  # catch up: one forward over the positions a model has not scored
        if models[name].ready < steps:
            record(advance(name, steps - 1))
    student_lp, teacher_rec, versions = (_trim(buffer, steps) for buffer in records.buffers())
    return (student_lp, _trim(tokens, steps), _trim(response_mask, steps), teacher_rec, versions,
            {name: model.calls for name, model in models.items()})


@dataclass
class _Scored:
    """One model's forward: ``logits``/``processed`` ``[B, n, V]`` (and ``hidden [B, n, d]`` or
    ``None``) of response positions ``start .. start + n - 1``."""

    name: str
    start: int
    logits: torch.Tensor
    processed: torch.Tensor
    hidden: torch.Tensor | None


class _Records:
    """The per-position records, ``[B, max_new(, ...)]``, written as the models score positions."""

    def __init__(self, cfg: SamplingConfig, batch: int, max_new: int, device, read_version: Callable[[], int]):
        self.cfg, self.max_new, self.read_version = cfg, max_new, read_version
        self.student_lp = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
        self.versions = torch.zeros(1, max_new, dtype=torch.long, device=device)
        self.teacher: _TeacherRecords | None = None

    def write(self, scored: _Scored, tokens: torch.Tensor) -> None:
        """Records of ``scored``'s positions; their tokens must be in ``tokens [B, max_new]``."""
        columns = slice(scored.start, scored.start + scored.logits.shape[1])
        sampled = tokens[:, columns]
        if scored.name == "student":
            self.student_lp[:, columns] = scored.processed.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
            self.versions[0, columns] = self.read_version()
            return
        record = _teacher_records(scored.logits, scored.processed, sampled, self.cfg, scored.hidden)
        if self.teacher is None:
            self.teacher = _TeacherRecords(**{
                name: None if value is None else
                torch.empty((value.shape[0], self.max_new, *value.shape[2:]), dtype=value.dtype, device=value.device)
                for name, value in vars(record).items()})
        for name, value in vars(record).items():
            if value is not None:
                getattr(self.teacher, name)[:, columns] = value

    def buffers(self) -> tuple[torch.Tensor, _TeacherRecords, torch.Tensor]:
        return self.student_lp, self.teacher, self.versions


def _trim(buffer, steps: int):
    """``buffer`` (a ``[B, max_new, ...]`` tensor, or :class:`_TeacherRecords` of them) cut to
    its first ``steps`` columns (a copy, so the rest of the buffer is freed)."""
    if isinstance(buffer, _TeacherRecords):
        return _TeacherRecords(**{name: _trim(value, steps) for name, value in vars(buffer).items()})
    return buffer if buffer is None or steps == buffer.shape[1] else buffer[:, :steps].clone()
