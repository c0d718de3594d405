"""Where a MiniLLM round's time goes, per role, and how many rollout workers balance the learners.

A round has two roles: the rollout workers (generate the round's rollouts, put them into the
replay store, load new weights between generations) and the learner ranks (sync the new weights
out, take the round from the store, learn). :func:`round_profile` turns the coordinator's stage
timings into each role's busy and waiting time. With ``runtime.max_staleness >= 1`` the roles
overlap, so a round takes about the slower role's busy time; with 0 they take turns, so about
the sum.

:func:`balance_advice` is the arithmetic behind "how many rollout workers per learner": from a
worker's generation rate and the learner group's learning rate (samples per busy second, as a
run measures them: :func:`measured_rates`), the number of workers at which generating a round
takes as long as learning on it. Rates measured where the roles share CPU cores (this 2-core
machine) include that contention; on separate devices they are each role's own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Learner-side stages of a round (runtime/phases/minillm.py): the weight sync out (export from the
# engine and publishing to the workers), the round out of the store and to every rank, the update.
LEARNER_STAGES = ("time/sync", "time/transfer", "time/learn")


def round_profile(timings: Mapping[str, float], round_seconds: float) -> dict[str, float]:
    """The round's ``time/*`` metrics: the stage ``timings`` (learner stages, ``time/wait_rollout``,
    and the workers' ``time/worker_*`` with ``time/worker_busy``), plus ``time/round``,
    ``time/learner_busy`` (sum of :data:`LEARNER_STAGES`), ``time/learner_wait`` (waiting for
    rollouts) and ``time/worker_idle`` (round minus the busiest worker's busy time, floored at 0:
    with overlap, a worker's generation can straddle two rounds)."""
    profile = dict(timings)
    profile["time/round"] = round_seconds
    profile["time/learner_busy"] = sum(timings.get(stage, 0.0) for stage in LEARNER_STAGES)
    profile["time/learner_wait"] = timings.get("time/wait_rollout", 0.0)
    if "time/worker_busy" in timings:
        profile["time/worker_idle"] = max(round_seconds - timings["time/worker_busy"], 0.0)
    return profile


@dataclass(frozen=True)
class BalanceAdvice:
    """Rollout workers that balance generation and learning (see :func:`balance_advice`)."""

    worker_samples_per_s: float  # one rollout worker, while busy
    learner_samples_per_s: float  # the whole learner group (num_learners ranks), while busy
    num_learners: int
    balanced_workers: float  # workers at which a round's generation takes as long as its learning
    recommended_workers: int  # the fewest whole workers that keep the learners from waiting

    @property
    def workers_per_learner(self) -> float:
        return self.recommended_workers / self.num_learners

    def workers_for(self, num_learners: int) -> int:
        """Whole workers for ``num_learners`` ranks, assuming learning scales with the ranks
        (the measured group's rate per rank, times ``num_learners``)."""
        balanced = self.balanced_workers / self.num_learners * num_learners
        return max(1, math.ceil(balanced - 1e-9))

    def round_seconds(self, num_workers: int, num_rollouts: int, overlapped: bool) -> float:
        """Predicted round time with ``num_workers``: generation and learning overlapped
        (``max_staleness >= 1``: the slower one) or in turn (0: both)."""
        generate = num_rollouts / (num_workers * self.worker_samples_per_s)
        learn = num_rollouts / self.learner_samples_per_s
        return max(generate, learn) if overlapped else generate + learn

    def summary(self, num_workers: int | None = None) -> str:
        """One line for the plan and the end of a run."""
        line = (f"a rollout worker generates {self.worker_samples_per_s:.3g} samples/s, the {self.num_learners} "
                f"learner rank(s) learn {self.learner_samples_per_s:.3g} samples/s: {self.balanced_workers:.2f} "
                f"worker(s) balance them; use {self.recommended_workers} "
                f"({self.workers_per_learner:.2g} per learner)")
        if num_workers is not None and num_workers != self.recommended_workers:
            slower = "generation" if num_workers < self.balanced_workers else "learning"
            line += f" (this run: {num_workers}, {slower} is the slower role)"
        return line


def balance_advice(worker_samples_per_s: float, learner_samples_per_s: float, num_learners: int) -> BalanceAdvice:
    """Workers needed so that generating a round is not slower than learning on it.

    ``W`` workers generate ``W * worker_samples_per_s`` samples/s, the learners consume
    ``learner_samples_per_s``; they balance at ``W = learner / worker`` and the advice is that,
    rounded up (at least 1). Assumes generation scales with the number of workers (each has its
    own device and the round splits evenly over them).

    Raises:
        ValueError: a rate is not positive, or ``num_learners < 1``.
    """
    if not (worker_samples_per_s > 0 and learner_samples_per_s > 0):
        raise ValueError(f"balance_advice: rates must be > 0, got worker {worker_samples_per_s}, "
                         f"learner {learner_samples_per_s} samples/s")
    if num_learners < 1:
        raise ValueError(f"balance_advice: num_learners must be >= 1, got {num_learners}")
    balanced = learner_samples_per_s / worker_samples_per_s
    # The tolerance keeps an exact ratio (e.g. 2.0 computed as 2.0000000001) from asking for one more.
    recommended = max(1, math.ceil(balanced - 1e-9))
    return BalanceAdvice(worker_samples_per_s, learner_samples_per_s, num_learners, balanced, recommended)


def measured_rates(rounds: Sequence[Mapping[str, Any]], num_rollouts: int, num_workers: int,
                   skip_first: bool = True) -> tuple[float, float]:
    """``(worker, learner)`` samples per busy second from a run's MiniLLM round records
    (``metrics.jsonl`` lines with ``time/worker_busy`` and ``time/learner_busy`` > 0; a round
    taken from the store without a report of its generation, e.g. the one in flight at a resume,
    has none); the first
    round (start-up: first loads, caches) is left out when there are others.

    A worker's rate uses the busiest worker's time and the average shard (``num_rollouts /
    num_workers``), so it is the rate that sets when the round's generation is done.

    Raises:
        ValueError: no round record with both busy times.
    """
    usable = [r for r in rounds if r.get("time/worker_busy", 0.0) > 0 and r.get("time/learner_busy", 0.0) > 0]
    if not usable:
        raise ValueError("no MiniLLM round in the metrics has time/worker_busy and time/learner_busy "
                         "(a run of this version with rollout workers writes them)")
    if skip_first and len(usable) > 1:
        usable = usable[1:]
    worker_busy = sum(r["time/worker_busy"] for r in usable)
    learner_busy = sum(r["time/learner_busy"] for r in usable)
    return num_rollouts / num_workers * len(usable) / worker_busy, num_rollouts * len(usable) / learner_busy


def advice_from_run(run_dir: str | Path) -> tuple[BalanceAdvice, int]:
    """The balance advice from a finished or running ``minillm-rl train`` directory (its
    ``config.yaml`` and ``metrics.jsonl``); also returns the run's number of workers.

    Raises:
        ValueError: the directory lacks those files, or has no usable MiniLLM round.
    """
    from minillm_rl.config import load_config

    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    for path in (config_path, metrics_path):
        if not path.is_file():
            raise ValueError(f"{path}: not found (expected a minillm-rl train output directory)")
    cfg = load_config(str(config_path))
    rounds = []
    for number, line in enumerate(metrics_path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{metrics_path}, line {number}: not a JSON object") from None
        if record.get("stage") == "minillm" and "time/round" in record:
            rounds.append(record)
    try:
        worker, learner = measured_rates(rounds, cfg.train.num_rollouts, cfg.runtime.num_rollout_workers)
    except ValueError as err:
        raise ValueError(f"{metrics_path}: {err}") from None
    return balance_advice(worker, learner, cfg.runtime.num_learners), cfg.runtime.num_rollout_workers
