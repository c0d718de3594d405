"""The supervised phases: SFT (algorithm.md §2) and its baselines KD and SeqKD (§5)."""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from minillm_rl.algorithm.batching import SupervisedBatch, collate_supervised
from minillm_rl.algorithm.ppo import apply_optimizer_step, token_mean_backward
from minillm_rl.algorithm.supervised import supervised_micro_batch_loss, validation_loss
from minillm_rl.algorithm.teacher_head import HiddenTeacher
from minillm_rl.data import TokenizedExample
from minillm_rl.runtime.phases.common import phase_progress, sampling_config, worker_calls
from minillm_rl.runtime.resume import checkpoint, maybe_preempt
from minillm_rl.runtime.rounds import crossed_interval, derived_seed, epoch_order, split_evenly
from minillm_rl.runtime.run import TrainingRun, broadcast_from_coordinator
from minillm_rl.runtime.selection import select
from minillm_rl.tracking import atomic_write_text


def _supervised_batches(run: TrainingRun, examples, batch_size: int):
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield collate_supervised([e.prompt_ids for e in chunk], [e.response_ids for e in chunk], run.pad_token_id)


def _validation_loss(run: TrainingRun, engine) -> float:
    """Token-mean response CE over the whole validation set. Every rank runs every batch: under
    ZeRO-3 a forward is collective, so all ranks must run the same number of them."""
    engine.eval()
    loss = validation_loss(engine, _supervised_batches(run, run.inputs.valid_examples, run.cfg.sft.micro_batch_size))
    engine.train()
    return loss


def _rank_batch(run: TrainingRun, examples, global_rows: list[int], rank: int) -> SupervisedBatch:
    """Rank ``rank``'s share (strided) of a global batch of ``examples``."""
    mine = [examples[i] for i in global_rows[rank :: run.world_size]]
    return collate_supervised([e.prompt_ids for e in mine], [e.response_ids for e in mine], run.pad_token_id)


def teacher_response_examples(run: TrainingRun) -> list[TokenizedExample]:
    """SeqKD targets (algorithm.md §5): one teacher sample (``alpha = 1``, the training sampling
    settings) per training prompt, replacing the human answer. Shard ``i`` is seeded from
    ``(train.seed, "seqkd", i)``, so a resumed run regenerates the same targets. Rank 0 generates
    and writes them to ``seqkd_targets.jsonl``; every rank gets them by broadcast."""
    examples = run.inputs.train_examples
    responses = None
    if run.is_coordinator:
        sampling = dataclasses.replace(sampling_config(run), alpha=1.0, teacher_dist="none")
        shards = split_evenly([e.prompt_ids for e in examples], len(run.workers))
        calls = worker_calls(run, "generate_from_teacher", [
            (shard, sampling, derived_seed(run.cfg.train.seed, "seqkd", i)) for i, shard in enumerate(shards)],
            "teacher generation (seqkd)")
        responses = []
        for rollout in calls.results():
            for ids, mask in zip(rollout.response_ids, rollout.response_mask):
                responses.append(ids[mask > 0].tolist())
        atomic_write_text(run.out / "seqkd_targets.jsonl", "".join(
            json.dumps({"prompt_ids": example.prompt_ids, "response_ids": response,
                        "response": run.tokenizer.decode(response, skip_special_tokens=True)}) + "\n"
            for example, response in zip(examples, responses)))
    responses = broadcast_from_coordinator(responses, run.rank, run.world_size)
    return [TokenizedExample(e.prompt_ids, response, "teacher") for e, response in zip(examples, responses)]


def _kd_teacher(run: TrainingRun, examples, global_rows: list[int], engine) -> torch.Tensor | HiddenTeacher:
    """Word-level KD targets for this rank's batch at the response positions, scored by the workers
    for every rank's batch (rank 0): ``[B, T, V]`` teacher log-probs (temperature 1), or with the
    ``hidden`` teacher signal its hidden states ``[B, T, d]`` with the learner's copy of its head."""
    sampling = sampling_config(run)
    hidden_dtype = sampling.teacher_dist_dtype if sampling.teacher_dist == "hidden" else None
    scores = None
    if run.is_coordinator:
        batches = [_rank_batch(run, examples, global_rows, rank) for rank in range(run.world_size)]
        # Position i predicts token i + 1: the T response tokens are predicted from P - 1 .. P + T - 2,
        # so the teacher scores the last T + 1 positions and the last one is dropped.
        inputs = [(torch.cat([b.prompt_ids, b.response_ids], 1),
                   torch.cat([b.prompt_mask, b.response_mask.long()], 1), 0, b.response_ids.shape[1] + 1,
                   hidden_dtype) for b in batches]
        scores = [(r.logprobs if hidden_dtype is None else r.hidden)[:, :-1]
                  for r in worker_calls(run, "score_teacher", inputs, "kd").results()]
    mine = broadcast_from_coordinator(scores, run.rank, run.world_size)[run.rank]
    if hidden_dtype is None:
        return mine
    return HiddenTeacher(mine, run.teacher_head(getattr(engine, "device", "cpu")))


def run_supervised(run: TrainingRun, engine) -> None:
    """SFT (algorithm.md §2) and its baselines (§5): ``kd`` mixes in the teacher's distribution
    on the human answers, ``seqkd`` trains on teacher samples instead of the human answers.

    ``sft.num_epochs`` epochs of seeded permutations; each optimizer step takes a global batch of
    ``sft.batch_size`` examples split over the ranks, with the loss the token mean over the whole
    global batch (as on one rank). Validation (loss on the human answers, Rouge-L) every
    ``sft.eval_interval`` steps (``train.eval_interval`` when 0) and at the end; a checkpoint after
    each validation.
    """
    cfg, progress = run.cfg, run.progress
    phase = run.phase_name()
    examples = teacher_response_examples(run) if phase == "seqkd" else run.inputs.train_examples
    batch_size = cfg.sft.batch_size
    steps_per_epoch = len(examples) // batch_size
    total = run.sft_total_steps()
    engine.train()
    eval_interval = cfg.sft.eval_interval or cfg.train.eval_interval
    line = phase_progress(run, total, phase, "steps")
    order, order_epoch = None, None
    while progress.phase_step < total:
        epoch, offset = divmod(progress.phase_step, steps_per_epoch)
        if order_epoch != epoch:
            order, order_epoch = epoch_order(cfg.train.seed, "sft", epoch, len(examples)), epoch
        global_rows = order[offset * batch_size : (offset + 1) * batch_size]
        started = time.perf_counter()
        teacher = _kd_teacher(run, examples, global_rows, engine) if phase == "kd" else None
        batch = _rank_batch(run, examples, global_rows, run.rank)
        lr = engine.get_lr()[0]
        loss, _ = supervised_micro_batch_loss(engine, batch, teacher_logits=teacher, kd_ratio=cfg.loss.kd_ratio)
        global_loss, tokens = token_mean_backward(engine, loss, batch.response_mask.sum())
        applied = apply_optimizer_step(engine)
        steps_before = progress.total_steps
        run.after_steps([applied])
        if run.is_coordinator:
            run.metrics.log(phase, progress.phase_step, {
                "loss": global_loss, "tokens": tokens, "lr": float(lr), "nonfinite_skipped": int(not applied),
                "grad_norm": float(engine.get_global_grad_norm() or 0.0), "epoch": epoch,
                "time/step": time.perf_counter() - started,
            })
            line.update(progress.phase_step, loss=global_loss)
        if crossed_interval(progress.phase_step - 1, progress.phase_step, eval_interval) or progress.phase_step == total:
            select(run, engine, validation_loss=_validation_loss(run, engine))
            checkpoint(run, engine)
        maybe_preempt(run, engine, steps_before)
    line.close()
