"""One MiniLLM round on the learner side (algorithm.md §3.7 and §4).

``minillm_micro_batch_loss`` is ``L_pg + L_single`` for one micro-batch of rollouts and
``pretrain_micro_batch_loss`` the PT term on a batch of corpus blocks; ``ppo_round`` runs
``ppo_epochs`` shuffled passes over a round's rollouts, one optimizer step per global micro-batch
(with ``lm_coef`` times a PT batch when a corpus is given), after which the caller discards the
rollouts and samples afresh.

One code path for one process and for data-parallel learners: every rank holds the whole round
and draws the same seeded global permutation; a global micro-batch of ``W * m`` rows (``W``
ranks, micro-batch ``m`` per rank) is split across the ranks, and each rank's token-mean loss is
scaled by ``its valid tokens * W / all valid tokens of the global micro-batch``. DeepSpeed
averages gradients over ranks, so each step follows the gradient of the token mean over the
global micro-batch: ``W`` ranks x ``m`` is the same optimisation as 1 rank x ``W * m``.
Advantage whitening is pooled over the same ranks (``group``), so it matches too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from minillm_rl.algorithm.advantages import AdvantageConfig, compute_advantages, importance_weights, masked_mean
from minillm_rl.errors import RunFailed
from minillm_rl.algorithm.forward import response_logits
from minillm_rl.algorithm.losses import minillm_loss, pt_loss
from minillm_rl.algorithm.sampler import Rollout, SamplingConfig
from minillm_rl.algorithm.teacher_head import HiddenTeacher, TeacherHead


@dataclass
class MiniLLMLossConfig:
    """Loss switches. Defaults: the reference code; ``single_step_weighted=True`` is the paper's
    variant that weights the single-step term by ``w``."""

    clip_eps: float = 0.2
    single_step: bool = True
    single_step_weighted: bool = False
    lm_coef: float = 1.0
    kd_ratio: float = 0.5


@dataclass
class PretrainBatch:
    """One rank's rows of a PT micro-batch (algorithm.md §4.4): corpus blocks, every token valid,
    and the teacher's next-token distribution at each position that has a next token.

    ``input_ids``: ``[b, L]``. Teacher (position ``i`` predicts token ``i + 1``; none for a plain
    LM term): ``teacher_logprobs`` ``[b, L - 1, V]``, or ``teacher_topk_logprobs`` and
    ``teacher_topk_ids`` ``[b, L - 1, K]``, or ``teacher_hidden`` ``[b, L - 1, d]`` (the teacher's
    final hidden states; the learner applies the head).
    """

    input_ids: torch.Tensor
    teacher_logprobs: torch.Tensor | None = None
    teacher_topk_logprobs: torch.Tensor | None = None
    teacher_topk_ids: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None

    def to(self, device) -> PretrainBatch:
        return PretrainBatch(**{name: None if value is None else value.to(device)
                                for name, value in vars(self).items()})


def pretrain_micro_batch_loss(model: torch.nn.Module, batch: PretrainBatch, kd_ratio: float,
                              teacher_head: TeacherHead | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_pt`` on ``batch``: ``(1 - kd_ratio)`` next-token CE ``+ kd_ratio`` soft CE to the teacher
    (:func:`~minillm_rl.algorithm.losses.pt_loss`); the plain CE when the batch has no teacher.
    ``teacher_head``: the frozen teacher LM head, for a batch that carries ``teacher_hidden``."""
    logits = model(input_ids=batch.input_ids, use_cache=False).logits[:, :-1]
    topk = None if batch.teacher_topk_logprobs is None else (batch.teacher_topk_logprobs, batch.teacher_topk_ids)
    hidden = None
    if batch.teacher_hidden is not None:
        if teacher_head is None:
            raise ValueError("pretrain_micro_batch_loss: the batch carries the teacher's hidden states; pass teacher_head")
        hidden = HiddenTeacher(batch.teacher_hidden, teacher_head)
    has_teacher = batch.teacher_logprobs is not None or topk is not None or hidden is not None
    return pt_loss(logits, batch.input_ids[:, 1:], batch.teacher_logprobs, kd_ratio if has_teacher else 0.0,
                   teacher_topk=topk, teacher_hidden=hidden)


def select_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The sub-batch ``rows`` of ``rollout`` (every ``[B, ...]`` tensor indexed on dim 0)."""
    fields = {name: value[rows] if isinstance(value, torch.Tensor) else value
              for name, value in vars(rollout).items()}
    return Rollout(**fields)


def minillm_micro_batch_loss(
    model: torch.nn.Module,
    rollout: Rollout,
    sampling: SamplingConfig,
    advantage_cfg: AdvantageConfig,
    loss_cfg: MiniLLMLossConfig,
    group: torch.distributed.ProcessGroup | None = None,
    teacher_head: TeacherHead | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_pg + L_single`` for one micro-batch (§4.1–§4.3), plus rollout statistics.

    Advantages are computed here, per micro-batch, because their whitening statistics are the
    micro-batch's (pooled over the data-parallel ``group``), as in the reference.
    ``teacher_head``: the frozen teacher LM head, for rollouts sampled with ``teacher_dist='hidden'``.
    """
    logits = response_logits(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                             rollout.response_mask)
    mask = rollout.response_mask
    weights = importance_weights(rollout.student_logprobs, rollout.teacher_logprobs, rollout.alpha, mask)
    advantages, rewards = compute_advantages(rollout, advantage_cfg, group=group)
    if not loss_cfg.single_step:
        rollout = dataclasses.replace(rollout, teacher_dist_logprobs=None, teacher_topk_logprobs=None,
                                      teacher_topk_ids=None, teacher_hidden=None)
    # The sampler recorded log q_old under this processing; the ratio must use the same.
    loss, stats = minillm_loss(logits, rollout, advantages, weights, clip_eps=loss_cfg.clip_eps,
                               temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                               weight_single_step=loss_cfg.single_step_weighted, teacher_head=teacher_head)
    stats.update({
        "reward/mean": masked_mean(rewards, mask).item(),
        # log q_old - log p per sampled token estimates the reverse-KL rate of the responses.
        "reverse_kl/per_token": masked_mean(rollout.student_logprobs - rollout.teacher_logprobs_raw, mask).item(),
        "w/mean": masked_mean(weights, mask).item(),
        "w/max": weights[mask > 0].max().item() if mask.any() else 0.0,
        "response_len/mean": mask.sum(-1).mean().item(),
    })
    return loss, stats


def rank_and_world(group: torch.distributed.ProcessGroup | None = None) -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    return 0, 1



def global_micro_batches(batch_size: int, micro_batch_size: int, world_size: int,
                         generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of global micro-batches: row indices ``[<= W * m]`` of a seeded permutation of
    the round. The permutation draws the same ``randperm`` as every world size,
    so the row order of a round does not depend on the world size."""
    order = torch.randperm(batch_size, generator=generator)
    step = micro_batch_size * world_size
    for start in range(0, batch_size, step):
        yield order[start : start + step]


def rank_rows(global_rows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of a global micro-batch (strided, so a short last micro-batch whose size
    is a multiple of ``world_size`` still gives every rank rows)."""
    return global_rows[rank::world_size]


def _check_same_round(rollout: Rollout, group: torch.distributed.ProcessGroup | None, world_size: int,
                      device: torch.device) -> None:
    """Every rank must pass the same round: compare batch size and policy version across ranks."""
    local = torch.tensor([rollout.response_ids.shape[0], rollout.policy_version], dtype=torch.long, device=device)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, local, group=group)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise ValueError(
                f"ppo_round: rank {rank} got (rows, policy_version)={tuple(other.tolist())}, "
                f"rank 0 {tuple(gathered[0].tolist())}; every rank must pass the same round of rollouts"
            )


def token_mean_backward(engine, loss: torch.Tensor, num_tokens: torch.Tensor,
                        group: torch.distributed.ProcessGroup | None = None,
                        rank_mean_loss: torch.Tensor | None = None) -> tuple[float, float]:
    """Backward of this rank's token-mean ``loss`` (over ``num_tokens`` valid tokens) scaled so
    that DeepSpeed's mean over ranks is the token mean over all ranks' tokens, plus
    ``rank_mean_loss`` unscaled: a term whose plain mean over ranks is its global value (the PT
    term: every rank has the same number of block tokens).

    A non-finite global loss (any rank's) turns every gradient non-finite, so that the engine's
    own overflow check (:func:`apply_optimizer_step`) skips the step on every rank; a loss that
    is non-finite only through a term without gradient would otherwise still update.

    Returns ``(global loss, global token count of loss)``, the same on every rank.
    """
    _, world_size = rank_and_world(group)
    tokens = num_tokens.detach().double()
    extra = torch.zeros((), dtype=torch.float64) if rank_mean_loss is None else rank_mean_loss.detach().double()
    # [valid tokens, token-weighted loss, extra term] summed over ranks: the global token mean,
    # the scale that turns DeepSpeed's mean over ranks into that token mean, the extra's mean.
    totals = torch.stack([tokens, tokens * loss.detach().double(), extra.cpu()]).to(getattr(engine, "device", "cpu"))
    if world_size > 1:
        torch.distributed.all_reduce(totals, group=group)
    total_tokens = totals[0].clamp(min=1.0)
    global_loss = (totals[1] / total_tokens + totals[2] / world_size).item()
    scale = tokens.to(totals.device) * world_size / total_tokens
    if not math.isfinite(global_loss):
        scale = torch.full_like(scale, math.nan)
    scaled = loss * scale.to(loss.dtype)
    engine.backward(scaled if rank_mean_loss is None else scaled + rank_mean_loss)
    return global_loss, totals[0].item()


def apply_optimizer_step(engine) -> bool:
    """``engine.step()``; returns whether the update was applied, ``False`` when the engine
    skipped it for a non-finite gradient (weights, optimizer state and LR schedule untouched).

    The decision is the engine's: TorchEngine checks the clipped norm; DeepSpeed's ZeRO 1-3
    optimizers treat a non-finite global gradient norm as an overflow (fp32, fp16, and bf16 with
    ``bf16.check_grad_overflow``, its default), and the norm is reduced over all ranks, so every
    rank decides alike. A config that lets a non-finite gradient through stops the run.
    """
    engine.step()
    applied = engine.was_step_applied()
    if applied and not math.isfinite(float(engine.get_global_grad_norm() or 0.0)):
        raise RunFailed("a non-finite gradient was applied to the weights: the DeepSpeed config does not skip such "
                        "steps (use ZeRO stage 1-3 and keep bf16.check_grad_overflow true)")
    return applied


def ppo_round(
    engine,
    rollout: Rollout,
    sampling: SamplingConfig,
    advantage_cfg: AdvantageConfig,
    loss_cfg: MiniLLMLossConfig,
    ppo_epochs: int,
    micro_batch_size: int,
    generator: torch.Generator,
    group: torch.distributed.ProcessGroup | None = None,
    pretrain: Callable[[int], PretrainBatch] | None = None,
    teacher_head: TeacherHead | None = None,
) -> list[dict[str, float]]:
    """``ppo_epochs`` passes over the round, one optimizer step per global micro-batch.

    Args:
        engine: a DeepSpeed engine (or a ``TorchEngine`` when no process group is up).
        rollout: the whole round, identical on every rank (``B`` rows, ``B`` divisible by the
            number of ranks ``W``), on any device: each micro-batch is moved to the engine's.
        micro_batch_size: rows per rank per step (``m``); each optimizer step sees ``W * m`` rows.
        generator: seeded identically on every rank (it draws the shared permutation).
        group: the data-parallel group (``None``: the world).
        pretrain: with a PT corpus, step index within the round -> this rank's PT batch, whose
            ``loss_cfg.lm_coef * L_pt`` joins that step's loss. Every rank calls it at the same
            steps (it may run a collective).
        teacher_head: the frozen teacher LM head (on the engine's device) when the rollouts and PT
            batches carry the teacher's hidden states (``teacher_dist='hidden'``).

    Returns:
        One stats dict per step, in order. ``loss`` is the global micro-batch's loss (token mean
        of the MiniLLM terms plus ``lm_coef`` x the mean PT term) and ``nonfinite_skipped`` 1.0
        when the step was skipped (both the same on every rank); the other entries (``pt/...``
        among them) describe this rank's rows only.
    """
    rank, world_size = rank_and_world(group)
    batch_size = rollout.response_ids.shape[0]
    if batch_size % world_size:
        raise ValueError(f"ppo_round: {batch_size} rollouts cannot be split over {world_size} ranks "
                         f"(the round size must be a multiple of the number of ranks)")
    device = getattr(engine, "device", torch.device("cpu"))  # DeepSpeed's; TorchEngine runs on CPU
    if world_size > 1:
        _check_same_round(rollout, group, world_size, device)
    history = []
    for epoch in range(ppo_epochs):
        for global_rows in global_micro_batches(batch_size, micro_batch_size, world_size, generator):
            micro = select_rows(rollout, rank_rows(global_rows, rank, world_size)).to(device)
            lr = engine.get_lr()[0]
            loss, stats = minillm_micro_batch_loss(engine, micro, sampling, advantage_cfg, loss_cfg, group,
                                                   teacher_head)
            pt_term = None
            if pretrain is not None:
                pt_value, pt_stats = pretrain_micro_batch_loss(engine, pretrain(len(history)).to(device),
                                                               loss_cfg.kd_ratio, teacher_head)
                pt_term = loss_cfg.lm_coef * pt_value
                stats.update({f"pt/{name}": value for name, value in pt_stats.items()})
            global_loss, total_tokens = token_mean_backward(engine, loss, micro.response_mask.sum(), group, pt_term)
            applied = apply_optimizer_step(engine)
            stats.update({
                "loss": global_loss,
                "nonfinite_skipped": float(not applied),
                "tokens": total_tokens,
                "lr": float(lr),
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "ppo_epoch": epoch,
            })
            history.append(stats)
    return history
