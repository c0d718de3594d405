"""Teacher-mixed sampling (algorithm.md §3.2-3.3): pure torch, any HF causal LM pair.

Each step both models' next-token logits go through the same ``process_logits``; the token is
drawn from ``p~ = alpha * p + (1 - alpha) * q_old`` and everything the learner needs is recorded,
so the learner never runs the teacher. With ``alpha == 0`` the teacher does not influence
decoding, so the student samples alone and the teacher scores the finished responses in one
batched forward (same records, far fewer teacher calls).

Longer than ~400 lines because the decode loop, its cached decoders and the records it fills
are one contract (the ``Rollout``) and are read together.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch

from minillm_rl.algorithm.forward import position_ids_from_mask, response_logits
from minillm_rl.algorithm.logits import process_logits
from minillm_rl.algorithm.teacher_head import HeadRecorder
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
    # [B, T] long: the student weight version whose distribution each token was drawn from, read
    # from the sampler's caller at every decode step (a weight sync landing mid-generation shows).
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


class _CachedDecoder:
    """One model decoding with its own KV cache; returns last-position logits ``[B, V]``.

    On CPU the LM head of a decode step is a ``[B, H] x [H, V]`` product that is bound by reading
    the weight; against a transposed contiguous copy of the head it measured 1.5x faster than
    ``F.linear`` (17.5 -> 11.7 ms for a 49k x 576 head at batch 8). So after the prefill, which
    runs the whole model, decode steps run the base model and this head copy, provided the
    prefill's logits are reproduced from its last hidden state (a model whose logits are not a
    plain linear map of it, e.g. with soft-capping, keeps the whole-model path).

    ``record_hidden`` (the teacher in ``hidden`` mode) also keeps ``next_hidden [B, d]``, the LM
    head's input behind ``next_logits``; a model whose logits are not that head's output is refused.
    """

    def __init__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, position_ids: torch.Tensor,
                 record_hidden: bool = False):
        # Imported here: the replay store unpickles Rollouts (this module) and needs no transformers.
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.recorder = HeadRecorder(model) if record_hidden else None
        self.next_hidden: torch.Tensor | None = None
        with self.recorder or contextlib.nullcontext():
            out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids,
                        cache=self.cache, use_cache=True, logits_to_keep=1,
                        output_hidden_states=prompt_ids.device.type == "cpu")
        self.next_logits = out.logits[:, -1]
        if self.recorder is not None:
            self.next_hidden = self.recorder.hidden_for(out.logits)[:, -1]
        if out.hidden_states is not None:
            self.head = _transposed_head(model, out.hidden_states[-1][:, -1], self.next_logits)

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        inputs = {"input_ids": tokens.unsqueeze(-1), "attention_mask": attention_mask, "position_ids": position_ids,
                  "cache": self.cache, "use_cache": True}
        if self.head is None:
            with self.recorder or contextlib.nullcontext():
                logits = self.model(**inputs, logits_to_keep=1).logits
            self.next_logits = logits[:, -1]
            if self.recorder is not None:
                self.next_hidden = self.recorder.hidden_for(logits)[:, -1]
            return
        weight_t, bias = self.head
        hidden = self.model.base_model(**inputs).last_hidden_state[:, -1]
        logits = hidden @ weight_t
        self.next_logits = logits if bias is None else logits.add_(bias)
        self.next_hidden = hidden


def _transposed_head(model, hidden: torch.Tensor, logits: torch.Tensor):
    """``(weight^T contiguous [H, V], bias or None)`` of ``model``'s LM head if ``hidden [B, H]``
    times it reproduces ``logits [B, V]``, else ``None``."""
    head = model.get_output_embeddings()
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if weight is None or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        return None
    weight_t = weight.detach().t().contiguous()
    candidate = hidden @ weight_t if bias is None else hidden @ weight_t + bias
    if candidate.shape != logits.shape or not torch.allclose(candidate.float(), logits.float(), rtol=1e-4, atol=1e-4):
        return None
    return weight_t, None if bias is None else bias.detach()


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
) -> Rollout:
    """Sample one response per prompt from the teacher-mixed distribution and record it.

    Args:
        student, teacher: HF causal LMs sharing the tokenizer (same logit width).
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts.
        cfg: sampling settings.
        eos_token_id: id or ids that end a response (the first one is part of it); ``None`` or
            ``[]`` never stops early.
        pad_token_id: written after a response's end.
        generator: RNG for :func:`sample_categorical` (on the models' device).
        policy_version: the student weight version, or a callable returning the version the
            student holds now, read after each student forward (``token_policy_versions``);
            ``Rollout.policy_version`` is the first one.
        timings: when given, seconds are added to ``"decode"`` (the student's forwards and the
            sampling) and ``"teacher"`` (the teacher's forwards and records: mixed into every
            step when ``alpha > 0``, one scoring forward after decoding otherwise).

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
    mixed = cfg.alpha > 0
    device = prompt_ids.device
    clock = StageClock(timings, sync=(lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None)
    read_version = policy_version if callable(policy_version) else lambda: policy_version
    with clock.measure("decode"):
        student_lp, tokens, response_mask, teacher_rec, versions = _decode(
            student, teacher if mixed else None, prompt_ids, prompt_mask, cfg, eos_token_id, pad_token_id,
            generator, read_version, clock,
        )
    if not mixed:
        with clock.measure("teacher"):
            teacher_rec = _score_with_teacher(teacher, prompt_ids, prompt_mask, tokens, response_mask, cfg)
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
    """Token-by-token sampling; the teacher (when given) is mixed in and its records kept.

    Returns ``student_logprobs [B, T]``, ``tokens [B, T]``, ``response_mask [B, T]``, when a
    teacher is given its :class:`_TeacherRecords` with ``[B, T(, K|V)]`` tensors (else ``None``),
    and ``versions [1, T]`` long: ``read_version()`` after the student forward behind each step.
    """
    batch, prompt_len = prompt_ids.shape
    max_new, device = cfg.max_new_tokens, prompt_ids.device
    eos_ids = _eos_tensor(eos_token_id, device)

    # The full-length mask is built once; step t attends to its first prompt_len + t + 1 columns.
    # Positions past a response's end are attended to as well: their outputs are never used.
    attention_mask = torch.ones(batch, prompt_len + max_new, dtype=torch.long, device=device)
    attention_mask[:, :prompt_len] = prompt_mask
    prompt_positions = position_ids_from_mask(prompt_mask)
    next_position = prompt_positions[:, -1:] + 1

    decoders = [_CachedDecoder(student, prompt_ids, attention_mask[:, :prompt_len], prompt_positions)]
    version = read_version()
    if teacher is not None:
        with clock.measure("teacher"):
            decoders.append(_CachedDecoder(teacher, prompt_ids, attention_mask[:, :prompt_len], prompt_positions,
                                           record_hidden=cfg.teacher_dist == "hidden"))

    # Buffers are filled column by column; torch.empty leaves untouched pages unallocated, so the
    # [B, max_new, V] exact buffer only costs memory for the steps actually taken.
    tokens = torch.full((batch, max_new), pad_token_id, dtype=torch.long, device=device)
    response_mask = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
    student_lp = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
    versions = torch.zeros(1, max_new, dtype=torch.long, device=device)
    teacher_buffers = None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new):
        student_all = processed_logprobs(decoders[0].next_logits, cfg)
        probs = student_all.exp()
        if teacher is not None:
            teacher_all = processed_logprobs(decoders[1].next_logits, cfg)
            probs.lerp_(teacher_all.exp(), cfg.alpha)
        sampled = sample_categorical(probs, generator)
        sampled.masked_fill_(finished, pad_token_id)

        tokens[:, step] = sampled
        response_mask[:, step] = (~finished).float()
        student_lp[:, step] = student_all.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        versions[0, step] = version
        if teacher is not None:
            with clock.measure("teacher"):
                record = _teacher_records(decoders[1].next_logits, teacher_all, sampled, cfg,
                                          decoders[1].next_hidden)
                if teacher_buffers is None:
                    teacher_buffers = _allocate_like(record, max_new)
                _write_column(teacher_buffers, record, step)

        finished |= torch.isin(sampled, eos_ids)
        steps = step + 1
        if steps == max_new or bool(finished.all()):
            break
        mask_now = attention_mask[:, : prompt_len + steps]
        decoders[0].step(sampled, mask_now, next_position)
        version = read_version()
        if teacher is not None:
            with clock.measure("teacher"):
                decoders[1].step(sampled, mask_now, next_position)
        next_position = next_position + 1

    def trim(buffer):
        return buffer if steps == max_new else buffer[:, :steps].clone()

    teacher_rec = None
    if teacher_buffers is not None:
        teacher_rec = _TeacherRecords(**{
            name: None if buffer is None else trim(buffer) for name, buffer in vars(teacher_buffers).items()
        })
    return trim(student_lp), trim(tokens), trim(response_mask), teacher_rec, trim(versions)


def _allocate_like(record: _TeacherRecords, max_new: int) -> _TeacherRecords:
    """``[B, max_new, ...]`` buffers for per-step records shaped ``[B, ...]``."""
    def empty(value):
        if value is None:
            return None
        return torch.empty((value.shape[0], max_new, *value.shape[1:]), dtype=value.dtype, device=value.device)

    return _TeacherRecords(**{name: empty(value) for name, value in vars(record).items()})


def _write_column(buffers: _TeacherRecords, record: _TeacherRecords, step: int) -> None:
    for name, value in vars(record).items():
        if value is not None:
            getattr(buffers, name)[:, step] = value


def _score_with_teacher(teacher, prompt_ids, prompt_mask, tokens, response_mask, cfg) -> _TeacherRecords:
    """Teacher records for already-sampled responses from one forward over prompt + response."""
    recorder = HeadRecorder(teacher) if cfg.teacher_dist == "hidden" else None
    with recorder or contextlib.nullcontext():
        teacher_logits = response_logits(teacher, prompt_ids, prompt_mask, tokens, response_mask)
    # response_logits drops the head's last position (it predicts past the response).
    hidden = None if recorder is None else recorder.hidden_for(teacher_logits, positions=slice(None, -1))
    return _teacher_records(teacher_logits, processed_logprobs(teacher_logits, cfg), tokens, cfg, hidden)
