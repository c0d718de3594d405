"""The phase loops run by :class:`~minillm_rl.coordinator.TrainingRun` on every learner rank.

Each loop resumes from ``run.progress.phase_step`` (the data position is derived from it), calls
``run.select`` at every ``train.eval_interval`` crossing and at the phase end, checkpoints after
each selection, and lets ``run.maybe_preempt`` stop the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from minillm_rl.advantages import AdvantageConfig
from minillm_rl.batching import SupervisedBatch, collate_supervised
from minillm_rl.coordinator import TrainingRun, broadcast_from_coordinator
from minillm_rl.rounds import (
    canonical_order,
    concat_rollouts,
    crossed_interval,
    derived_seed,
    epoch_order,
    mean_stats,
    permuted_chunk,
    round_prompt_indices,
    split_evenly,
)
from minillm_rl.data import TokenizedExample
from minillm_rl.rollout.sampler import SamplingConfig
from minillm_rl.tracking import atomic_write_text
from minillm_rl.trainer.minillm import (
    MiniLLMLossConfig,
    PretrainBatch,
    apply_optimizer_step,
    ppo_round,
    token_mean_backward,
)
from minillm_rl.trainer.sft import supervised_micro_batch_loss, validation_loss


def _progress_bar(run: TrainingRun, total: int, desc: str) -> tqdm:
    """The phase's bar; kept on ``run`` so that ``run.close`` ends its line before an error is printed."""
    run.progress_bar = tqdm(total=total, initial=min(run.progress.phase_step, total), desc=desc,
                            dynamic_ncols=True, disable=not run.is_coordinator)
    return run.progress_bar


# --------------------------------------------------------------------------------------------
# Supervised phases: sft, kd, seqkd
# --------------------------------------------------------------------------------------------

def _supervised_batches(run: TrainingRun, examples, batch_size: int):
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield collate_supervised([e.prompt_ids for e in chunk], [e.response_ids for e in chunk], run.pad_token_id)


def _validation_loss(run: TrainingRun, engine) -> float:
    """Token-mean response CE over the whole validation set. Every rank runs every batch: under
    ZeRO-3 a forward is collective, so all ranks must run the same number of them."""
    engine.eval()
    loss = validation_loss(engine, _supervised_batches(run, run.valid_examples, run.cfg.sft.micro_batch_size))
    engine.train()
    return loss


def _rank_batch(run: TrainingRun, examples, global_rows: list[int], rank: int) -> SupervisedBatch:
    """Rank ``rank``'s share (strided) of a global batch of ``examples``."""
    mine = [examples[i] for i in global_rows[rank :: run.world_size]]
    return collate_supervised([e.prompt_ids for e in mine], [e.response_ids for e in mine], run.pad_token_id)


def _worker_calls(run: TrainingRun, method: str, argument_lists: list[tuple], what: str):
    """``method`` on the workers round-robin, one call per argument tuple, re-made on a restarted
    worker (rank 0; :class:`~minillm_rl.rollout.client.WorkerCalls`)."""
    from minillm_rl.rollout.client import WorkerCalls

    return WorkerCalls(run.workers, method, argument_lists, run.cfg.runtime.rpc_timeout_s, what)


def teacher_response_examples(run: TrainingRun) -> list[TokenizedExample]:
    """SeqKD targets (algorithm.md §5): one teacher sample (``alpha = 1``, the training sampling
    settings) per training prompt, replacing the human answer. Shard ``i`` is seeded from
    ``(train.seed, "seqkd", i)``, so a resumed run regenerates the same targets. Rank 0 generates
    and writes them to ``seqkd_targets.jsonl``; every rank gets them by broadcast."""
    responses = None
    if run.is_coordinator:
        sampling = dataclasses.replace(_sampling_config(run), alpha=1.0, teacher_dist="none")
        shards = split_evenly([e.prompt_ids for e in run.train_examples], len(run.workers))
        calls = _worker_calls(run, "generate_from_teacher", [
            (shard, sampling, derived_seed(run.cfg.train.seed, "seqkd", i)) for i, shard in enumerate(shards)],
            "teacher generation (seqkd)")
        responses = []
        for rollout in calls.results():
            for ids, mask in zip(rollout.response_ids, rollout.response_mask):
                responses.append(ids[mask > 0].tolist())
        atomic_write_text(run.out / "seqkd_targets.jsonl", "".join(
            json.dumps({"prompt_ids": example.prompt_ids, "response_ids": response,
                        "response": run.tokenizer.decode(response, skip_special_tokens=True)}) + "\n"
            for example, response in zip(run.train_examples, responses)))
    responses = broadcast_from_coordinator(responses, run.rank, run.world_size)
    return [TokenizedExample(e.prompt_ids, response, "teacher") for e, response in zip(run.train_examples, responses)]


def _teacher_logprobs(run: TrainingRun, examples, global_rows: list[int]) -> torch.Tensor:
    """Word-level KD targets for this rank's batch: ``[B, T, V]`` teacher log-probs (temperature 1)
    at the response positions, scored by the workers for every rank's batch (rank 0)."""
    scores = None
    if run.is_coordinator:
        batches = [_rank_batch(run, examples, global_rows, rank) for rank in range(run.world_size)]
        # Position i predicts token i + 1: the T response tokens are predicted from P - 1 .. P + T - 2,
        # so the teacher scores the last T + 1 positions and the last one is dropped.
        inputs = [(torch.cat([b.prompt_ids, b.response_ids], 1),
                   torch.cat([b.prompt_mask, b.response_mask.long()], 1), 0, b.response_ids.shape[1] + 1)
                  for b in batches]
        scores = [r.logprobs[:, :-1] for r in _worker_calls(run, "score_teacher", inputs, "kd").results()]
    return broadcast_from_coordinator(scores, run.rank, run.world_size)[run.rank]


def run_supervised(run: TrainingRun, engine) -> None:
    """SFT (algorithm.md §2) and its baselines (§5): ``kd`` mixes in the teacher's distribution
    on the human answers, ``seqkd`` trains on teacher samples instead of the human answers.

    ``sft.num_epochs`` epochs of seeded permutations; each optimizer step takes a global batch of
    ``sft.batch_size`` examples split over the ranks, with the loss the token mean over the whole
    global batch (as on one rank). Validation (loss on the human answers, Rouge-L) every
    ``train.eval_interval`` steps and at the end.
    """
    cfg, progress = run.cfg, run.progress
    phase = run.phase_name()
    examples = teacher_response_examples(run) if phase == "seqkd" else run.train_examples
    batch_size = cfg.sft.batch_size
    steps_per_epoch = len(examples) // batch_size
    total = run.sft_total_steps()
    engine.train()
    bar = _progress_bar(run, total, phase)
    order, order_epoch = None, None
    while progress.phase_step < total:
        epoch, offset = divmod(progress.phase_step, steps_per_epoch)
        if order_epoch != epoch:
            order, order_epoch = epoch_order(cfg.train.seed, "sft", epoch, len(examples)), epoch
        global_rows = order[offset * batch_size : (offset + 1) * batch_size]
        started = time.perf_counter()
        teacher = _teacher_logprobs(run, examples, global_rows) if phase == "kd" else None
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
            bar.update(1)
            bar.set_postfix(loss=f"{global_loss:.3f}")
        if crossed_interval(progress.phase_step - 1, progress.phase_step, cfg.train.eval_interval) \
                or progress.phase_step == total:
            run.select(engine, validation_loss=_validation_loss(run, engine))
            run.checkpoint(engine)
        run.maybe_preempt(engine, steps_before)
    bar.close()


# --------------------------------------------------------------------------------------------
# MiniLLM
# --------------------------------------------------------------------------------------------

def _sampling_config(run: TrainingRun) -> SamplingConfig:
    section = asdict(run.cfg.sampling)
    return SamplingConfig(**{**section, "teacher_dist_dtype": getattr(torch, section["teacher_dist_dtype"])})


class _RolloutClient:
    """Rank 0's side of generation for ``run``: the round's shards and seeds, and its assembly;
    weight sync, launch and fault recovery are :class:`~minillm_rl.rollout.client.RolloutClient`'s."""

    def __init__(self, run: TrainingRun, sampling: SamplingConfig):
        from minillm_rl.rollout.client import RolloutClient

        self.run = run
        runtime = run.cfg.runtime
        self.client = RolloutClient(run.workers, run.replay, sampling,
                                    lambda: (run.eval_model, run.progress.policy_version),
                                    runtime.rpc_timeout_s, runtime.weight_sync_timeout_s)

    @property
    def pending(self) -> int | None:
        """The round in flight, if any."""
        return self.client.pending_round

    def sync(self) -> None:
        """Bring every worker to the learner's version (after an update, or a worker restart)."""
        self.client.sync()

    def launch(self, round_index: int) -> None:
        """Workers generate round ``round_index`` into the replay store, shard ``i`` seeded from
        ``(train.seed, round, i)``, with the weights they hold now (the learner's version)."""
        run = self.run
        indices = round_prompt_indices(run.cfg.train.seed, round_index, run.cfg.train.num_rollouts,
                                       len(run.train_examples))
        shards = split_evenly([run.train_examples[i].prompt_ids for i in indices], len(run.workers))
        seeds = [derived_seed(run.cfg.train.seed, "rollout", round_index, i) for i in range(len(shards))]
        self.client.launch(round_index, shards, seeds)

    def take_round(self, round_index: int):
        """The round's rollouts, no older than ``version - max_staleness``, in canonical order."""
        run = self.run
        items = self.client.take_round(round_index, run.cfg.train.num_rollouts,
                                       run.progress.policy_version - run.cfg.runtime.max_staleness)
        items = canonical_order(items)
        rollout = concat_rollouts([item.payload for item in items], run.pad_token_id)
        versions = [item.policy_version for item in items]
        return rollout, {"rollout_policy_version/min": min(versions), "rollout_policy_version/max": max(versions)}

    def replay_stats(self) -> dict[str, float]:
        return {f"replay/{key}": value for key, value in self.client.replay_stats().items()}


class _PretrainFeed:
    """The PT term's batches (algorithm.md §4.4): optimizer step ``g`` of the phase takes chunk
    ``g`` (``train.micro_batch_size`` blocks) of the seeded permutations of the corpus blocks, so a
    resumed run draws the same blocks. When the term mixes in the teacher (``loss.kd_ratio > 0``),
    rank 0 has the workers score every rank's rows in the ``sampling.teacher_dist`` mode (exact
    or top-K) and broadcasts them; the next step's scores are requested before this step's are
    awaited (the teacher is frozen, so they do not depend on the policy version)."""

    def __init__(self, run: TrainingRun, blocks: torch.Tensor):
        self.run, self.blocks = run, blocks
        sampling = run.cfg.sampling
        self.top_k = None if run.cfg.loss.kd_ratio == 0 else (0 if sampling.teacher_dist == "exact"
                                                              else sampling.teacher_topk)
        self._requested: dict = {}  # step -> WorkerCalls

    def _rank_rows(self, step: int) -> list[list[int]]:
        run = self.run
        rows = permuted_chunk(run.cfg.train.seed, "pretrain", step, run.cfg.train.micro_batch_size,
                              len(self.blocks))
        return [rows[rank :: run.world_size] for rank in range(run.world_size)]

    def _request(self, step: int):
        inputs = [(self.blocks[rows], torch.ones(len(rows), self.blocks.shape[1], dtype=torch.long), self.top_k)
                  for rows in self._rank_rows(step)]
        return _worker_calls(self.run, "score_teacher", inputs, "PT")

    def _teacher_scores(self, step: int) -> list[tuple] | None:
        """Rank 0: every rank's teacher scores at the positions that predict a next token."""
        if not self.run.is_coordinator:
            return None
        calls = self._requested.pop(step, None) or self._request(step)
        self._requested[step + 1] = self._request(step + 1)
        results = calls.results()
        if self.top_k == 0:
            return [(r.logprobs[:, :-1], None, None) for r in results]
        return [(None, r.topk_logprobs[:, :-1], r.topk_ids[:, :-1]) for r in results]

    def batch(self, step: int) -> PretrainBatch:
        """This rank's PT batch of phase step ``step`` (every rank calls it: a broadcast)."""
        run = self.run
        input_ids = self.blocks[self._rank_rows(step)[run.rank]]
        if self.top_k is None:
            return PretrainBatch(input_ids)
        scores = broadcast_from_coordinator(self._teacher_scores(step), run.rank, run.world_size)[run.rank]
        return PretrainBatch(input_ids, *scores)


def run_minillm(run: TrainingRun, engine) -> None:
    """MiniLLM rounds (algorithm.md §3): generate ``train.num_rollouts`` teacher-mixed rollouts,
    ``train.ppo_epochs`` passes of data-parallel updates, sync the new weights; until
    ``train.total_steps`` optimizer steps (whole rounds: the last one may pass it) or
    ``train.max_prompt_epochs`` passes over the prompts."""
    cfg, progress = run.cfg, run.progress
    train = cfg.train
    steps_per_round = train.ppo_epochs * (train.num_rollouts // train.micro_batch_size)
    num_rounds = min(math.ceil(train.total_steps / steps_per_round),
                     train.max_prompt_epochs * len(run.train_examples) // train.num_rollouts)
    if num_rounds < 1:
        raise ValueError(f"train.num_rollouts={train.num_rollouts} exceeds train.max_prompt_epochs x "
                         f"{len(run.train_examples)} training prompts: not even one round")
    sampling = _sampling_config(run)
    advantage_cfg = AdvantageConfig(**asdict(cfg.advantage))
    loss_cfg = MiniLLMLossConfig(cfg.loss.clip_eps, cfg.loss.single_step, cfg.loss.single_step_weighted,
                                 cfg.loss.lm_coef, cfg.loss.kd_ratio)
    pretrain = None if run.pretrain_blocks is None else _PretrainFeed(run, run.pretrain_blocks)
    overlap = cfg.runtime.max_staleness >= 1
    client = _RolloutClient(run, sampling) if run.is_coordinator else None
    engine.eval()  # as the reference: no dropout during MiniLLM updates
    if progress.phase_step == 0:
        run.select(engine)  # the initial (SFT) weights compete for best/ too
    bar = _progress_bar(run, num_rounds * steps_per_round, "minillm")
    for round_index in range(progress.phase_step // steps_per_round, num_rounds):
        round_started = time.perf_counter()
        timings: dict[str, float] = {}
        if run.exported_version != progress.policy_version:
            run.export(engine)
        rollout, round_stats = None, {}
        if client is not None:
            started = time.perf_counter()
            client.sync()
            timings["time/sync"] = time.perf_counter() - started
            started = time.perf_counter()
            if client.pending is None:
                client.launch(round_index)
            rollout, round_stats = client.take_round(round_index)
            if overlap and round_index + 1 < num_rounds:
                client.launch(round_index + 1)  # generated with version v while the learners update
            timings["time/rollout"] = time.perf_counter() - started
        started = time.perf_counter()
        rollout = broadcast_from_coordinator(rollout, run.rank, run.world_size)
        timings["time/transfer"] = time.perf_counter() - started
        started = time.perf_counter()
        learner_version = progress.policy_version
        first_step = round_index * steps_per_round
        history = ppo_round(engine, rollout, sampling, advantage_cfg, loss_cfg, train.ppo_epochs,
                            train.micro_batch_size // run.world_size,
                            torch.Generator().manual_seed(derived_seed(train.seed, "ppo", round_index)),
                            pretrain=None if pretrain is None else lambda i: pretrain.batch(first_step + i))
        timings["time/learn"] = time.perf_counter() - started
        steps_before = progress.total_steps
        previous_step = progress.phase_step
        skipped = [step["nonfinite_skipped"] > 0 for step in history]
        run.after_steps([not s for s in skipped])
        progress.policy_version += 1
        started = time.perf_counter()
        run.export(engine)
        timings["time/sync"] = timings.get("time/sync", 0.0) + time.perf_counter() - started
        if client is not None:
            elapsed = time.perf_counter() - round_started
            run.metrics.log("minillm", progress.phase_step, {
                **mean_stats(history), **round_stats, **timings, **client.replay_stats(),
                "nonfinite_skipped": sum(skipped), "learner_policy_version": learner_version, "round": round_index,
                "samples_per_s": train.num_rollouts / elapsed, "time/round": elapsed,
            })
            bar.update(len(history))
        if crossed_interval(previous_step, progress.phase_step, train.eval_interval) or round_index + 1 == num_rounds:
            run.select(engine)
            run.checkpoint(engine)
        run.maybe_preempt(engine, steps_before)
    bar.close()
