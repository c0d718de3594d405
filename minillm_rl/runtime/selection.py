"""Validation during training and checkpoint selection (algorithm.md §2, §6).

``select`` scores the current weights: the SFT init is the lowest-validation-loss SFT checkpoint
(``sft_best_loss/``); the run's result is the final phase's best validation Rouge-L (``best/`` +
``best.json``). Validation texts are split over the rollout workers when the run has them (they
get ``eval_model``'s weights), else over the learner ranks, each with its engine's module on its
own device (collective under ZeRO-3); the draws depend on the seed and on the number of workers
or ranks.

Functions here take the :class:`~minillm_rl.runtime.run.TrainingRun` as ``run``.
"""

from __future__ import annotations

import functools
import time

import torch.distributed as dist

from minillm_rl.config import PHASES_USING_TEACHER
from minillm_rl.evaluation.protocol import EvalConfig, evaluate, generate_responses
from minillm_rl.runtime.rounds import derived_seed, split_evenly
from minillm_rl.tracking import atomic_write_json, log_line

# Worker version tags of weights pushed for validation in supervised phases: above any MiniLLM
# policy version (one per round), so they never pass for one.
SUPERVISED_EVAL_VERSION_BASE = 2**40


def eval_on_workers(run) -> bool:
    """The same answer on every rank (only rank 0 holds the worker handles)."""
    phases = run.cfg.train.phases
    return run.cfg.runtime.eval_on_workers and any(phase in PHASES_USING_TEACHER for phase in phases)


def validation_config(run) -> EvalConfig:
    """One sample per validation prompt, seeded by ``train.seed``: at the training sampling settings
    (``eval.validation: sampling``, the reference's), or under the test protocol (``test``:
    temperature 1, ``eval.no_repeat_ngram_size``, ``eval.max_new_tokens``)."""
    cfg = run.cfg
    if cfg.eval.validation == "test":
        return EvalConfig(seeds=(cfg.train.seed,), no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size,
                          max_new_tokens=cfg.eval.max_new_tokens, protocol="validation (test protocol)")
    s = cfg.sampling
    return EvalConfig.validation(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                 max_new_tokens=s.max_new_tokens, seed=cfg.train.seed)


def validation_protocol(run) -> str:
    c = validation_config(run)
    where = f"split over {run.cfg.runtime.num_rollout_workers} rollout workers" if eval_on_workers(run) \
        else f"split over {run.world_size} learner ranks"
    return (f"{c.protocol}: {len(run.inputs.valid_examples)} held-out prompts, one sample each at temperature "
            f"{c.temperature}, top_k {c.top_k}, top_p {c.top_p}, no_repeat_ngram_size {c.no_repeat_ngram_size}, "
            f"max_new_tokens {c.max_new_tokens}, seed {c.seeds[0]}, {where}")


def _generate_on_workers(run, eval_cfg: EvalConfig, prompt_id_lists: list[list[int]], seed: int) -> list[str]:
    """Validation texts from the rollout workers, which get ``eval_model``'s weights first. The
    version tag: the MiniLLM policy version (the next round's sync then has nothing to send);
    in supervised phases one no policy version can equal, so MiniLLM's first sync replaces it."""
    from minillm_rl.runtime.rollout.client import generate_texts_on_workers

    progress, runtime = run.progress, run.cfg.runtime
    version = progress.policy_version if run.phase_name() == "minillm" \
        else SUPERVISED_EVAL_VERSION_BASE + progress.total_steps
    shards = split_evenly(prompt_id_lists, len(run.workers))
    seeds = [derived_seed(seed, "validation", i) for i in range(len(shards))]
    texts = generate_texts_on_workers(run.workers, shards, seeds, eval_cfg, run.eval_model, version,
                                      runtime.rpc_timeout_s, runtime.weight_sync_timeout_s)
    return [text for shard in texts for text in shard]


def _generate_on_learners(run, engine, eval_cfg: EvalConfig, prompt_id_lists: list[list[int]],
                          seed: int) -> list[str]:
    """Validation texts generated data-parallel by the learner ranks with the engine's own
    module, on their devices: rank ``r`` takes prompts ``r, r + W, ...`` (padded with copies of
    the first prompt to equal counts: under ZeRO-3 every forward is collective, so every rank
    runs as many batches, with ``synced_gpus``); the texts are gathered on every rank."""
    world = run.world_size
    mine = prompt_id_lists[run.rank :: world]
    per_rank = -(-len(prompt_id_lists) // world)
    module = engine.module
    was_training = module.training
    module.eval()
    try:
        texts = generate_responses(module, run.tokenizer, mine + [prompt_id_lists[0]] * (per_rank - len(mine)),
                                   eval_cfg, derived_seed(seed, "validation", run.rank),
                                   synced_gpus=world > 1 and engine.zero_optimization_stage() == 3)[: len(mine)]
    finally:
        module.train(was_training)
    gathered = [texts]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, texts)
    ordered = [""] * len(prompt_id_lists)
    for rank, rank_texts in enumerate(gathered):
        ordered[rank::world] = rank_texts
    return ordered


def validation_rouge(run, engine) -> float | None:
    """Rouge-L of the current weights on the validation set: generated by the rollout workers
    (rank 0 asks them; the other ranks return None), or data-parallel by the learner ranks
    (every rank calls this and gets the score)."""
    eval_cfg = validation_config(run)
    if eval_on_workers(run):
        if not run.is_coordinator:
            return None
        generate = functools.partial(_generate_on_workers, run, eval_cfg)
    else:
        generate = functools.partial(_generate_on_learners, run, engine, eval_cfg)
    return evaluate(None, run.tokenizer, run.inputs.valid_examples, run.inputs.references, eval_cfg,
                    generate=generate).rouge_l


def select(run, engine, validation_loss: float | None = None, selectable: bool = True) -> dict[str, float]:
    """Validation of the current weights: Rouge-L (rank 0) and, for SFT, the given loss; keeps
    ``sft_best_loss/`` (lowest loss), ``best/`` + ``best.json`` (best Rouge-L of the last phase).
    ``selectable=False``: scored and logged only (a phase's starting weights, which are not its
    checkpoints unless ``eval.select_initial``)."""
    started = time.perf_counter()
    progress = run.progress
    if run.phase_name() != "minillm" or run.exported_version != progress.policy_version:
        run.export(engine)  # supervised steps do not bump the policy version
    phase, step = run.phase_name(), progress.phase_step
    record: dict[str, float] = {}
    if validation_loss is not None:
        record["validation_loss"] = validation_loss
        if phase == "sft" and validation_loss < progress.best_validation_loss:
            progress.best_validation_loss, progress.best_validation_loss_step = validation_loss, step
            if run.is_coordinator:
                run.save_model("sft_best_loss")
    score = validation_rouge(run, engine)
    if run.is_coordinator:
        record["validation_rouge_l"] = score
        best = progress.best_rouge.get(phase)
        improved = selectable and (best is None or score > best["validation_rouge_l"])
        if improved:
            progress.best_rouge[phase] = {"step": step, "validation_rouge_l": score}
            if progress.phase_index == len(run.cfg.train.phases) - 1:
                run.save_model("best")
                write_best_json(run)
        record["time/eval"] = time.perf_counter() - started
        run.metrics.log(phase, step, record)
        loss_text = f"validation loss {validation_loss:.3f}, " if validation_loss is not None else ""
        best = progress.best_rouge.get(phase)
        standing = ("starting weights, not selectable" if not selectable and best is None
                    else f"best {best['validation_rouge_l']:.2f}{', new best' if improved else ''}")
        log_line(f"{phase} step {step}: {loss_text}validation Rouge-L {score:.2f} ({standing})")
    return record


def write_best_json(run) -> None:
    final_phase = run.cfg.train.phases[-1]
    best = run.progress.best_rouge.get(final_phase)
    if best is None:
        return
    atomic_write_json(run.out / "best.json", {
        "phase": final_phase, "step": best["step"], "validation_rouge_l": best["validation_rouge_l"],
        "protocol": validation_protocol(run), "best_by_phase": run.progress.best_rouge,
    })
