"""The rollout side of a run on rank 0: Ray, the rollout worker actors and the replay store.

Started once per run by the coordinator when a phase needs the teacher (``kd``, ``seqkd``,
``minillm``); closed also after a failure, so no actor outlives the run.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from minillm_rl.config import RunConfig
from minillm_rl.models import load_causal_lm, load_tokenizer
from minillm_rl.runtime.rollout.worker import call_with_timeout, make_rollout_worker
from minillm_rl.tracking import log_line


def warn_if_overlapped_roles_contend(cfg: RunConfig) -> None:
    """One line when overlapped roles (``max_staleness >= 1``) of a local CPU run ask for more
    threads than the machine's cores: every OpenMP barrier then waits for a descheduled thread.
    Measured on 2 cores (bench-runtime's setting, hidden signal): worker 2 + learner 2 threads
    made 22 s rounds (on-policy: 18 s); worker 1 + learner 1 made 15.8 s rounds."""
    runtime = cfg.runtime
    if runtime.max_staleness < 1 or runtime.ray_address != "local" or runtime.worker_gpus or torch.cuda.is_available():
        return
    cores = len(os.sched_getaffinity(0))
    learner_threads = runtime.learner_threads or torch.get_num_threads()
    threads = runtime.num_rollout_workers * runtime.worker_threads + runtime.num_learners * learner_threads
    if threads > cores:
        log_line(f"warning: max_staleness {runtime.max_staleness} overlaps generation with learning, but "
                 f"{runtime.num_rollout_workers} rollout worker(s) x {runtime.worker_threads} thread(s) and "
                 f"{runtime.num_learners} learner rank(s) x {learner_threads} thread(s) ask for {threads} threads "
                 f"on {cores} cores: the roles will stall each other; split the cores with runtime.worker_threads "
                 f"and runtime.learner_threads")


def wait_until_started(first_calls: dict[str, Any], timeout_s: float) -> None:
    """Wait for one call per actor (name -> reference), which Ray runs after the actor's
    constructor, so all have started; a constructor's error is raised as its one line.

    Raises:
        TimeoutError: naming every actor not started within ``timeout_s``.
        ActorDied: an actor's constructor failed.
    """
    import ray

    names, refs = list(first_calls), list(first_calls.values())
    _, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if late:
        raise TimeoutError(f"{', '.join(name for name, ref in zip(names, refs) if ref in late)} did not start "
                           f"within {timeout_s:g} s (runtime.actor_start_timeout_s)")
    call_with_timeout(refs, timeout_s, f"starting {', '.join(names)}")


class RolloutFleet:
    """``workers`` (Ray ``RolloutWorker`` actors, teacher + student copy each) and ``replay`` (the
    ``ReplayStore`` actor), on a Ray this process joined or started (``runtime.ray_address``).

    Creating an actor returns at once; its constructor (loading the teacher) runs in the background
    while the learners build their engines. The first use of ``workers`` or ``replay`` waits for every
    actor to have started, within ``runtime.actor_start_timeout_s``: a slow load (a 13B teacher from
    a network disk) is then not charged to the first call's ``rpc_timeout_s``, which can stay as short
    as a shard needs."""

    def __init__(self, cfg: RunConfig):
        import ray

        from minillm_rl.runtime.replay import make_replay_store_actor

        runtime, model = cfg.runtime, cfg.model
        self.rpc_timeout_s, self.start_timeout_s = runtime.rpc_timeout_s, runtime.actor_start_timeout_s
        self._ray_started = self._actors_started = False
        warn_if_overlapped_roles_contend(cfg)
        if runtime.ray_address == "local":
            ray.init(num_cpus=runtime.num_rollout_workers * runtime.worker_threads, include_dashboard=False,
                     log_to_driver=False)
            self._ray_started = True
        elif not ray.is_initialized():
            ray.init(address=runtime.ray_address, log_to_driver=False)
        dtype = getattr(torch, model.dtype)
        teacher = functools.partial(load_causal_lm, model.teacher, dtype, model.teacher_gguf_file)
        student = functools.partial(load_causal_lm, model.student, dtype, model.student_gguf_file)
        tokenizer = functools.partial(load_tokenizer, model.student, model.student_gguf_file)
        gpus = f", {runtime.worker_gpus:g} GPU(s) each" if runtime.worker_gpus else ""
        print(f"minillm-rl: starting {runtime.num_rollout_workers} Ray rollout worker(s) (teacher + student copy "
              f"each, {runtime.worker_threads} thread(s){gpus}) and the replay store", flush=True)
        self._workers = [make_rollout_worker(teacher, student, tokenizer, threads=runtime.worker_threads,
                                             seed=cfg.train.seed, name=f"rollout-worker-{i}",
                                             num_gpus=runtime.worker_gpus,
                                             device="cuda" if runtime.worker_gpus else "cpu")
                         for i in range(runtime.num_rollout_workers)]
        self._replay = make_replay_store_actor(runtime.replay_max_samples, runtime.replay_max_bytes)
        self._names = [f"rollout-worker-{i}" for i in range(len(self._workers))] + ["the replay store"]

    def _wait_started(self) -> None:
        """Once: every actor's constructor has returned."""
        if not self._actors_started:
            calls = [worker.policy_version.remote() for worker in self._workers] + [self._replay.stats.remote()]
            wait_until_started(dict(zip(self._names, calls)), self.start_timeout_s)
            self._actors_started = True

    @property
    def workers(self) -> list:
        self._wait_started()
        return self._workers

    @property
    def replay(self):
        self._wait_started()
        return self._replay

    def replay_counters(self) -> dict[str, int]:
        """The replay store's counters, saved in checkpoints."""
        return call_with_timeout(self.replay.state_dict.remote(), self.rpc_timeout_s, "replay.state_dict")

    def restore_replay_counters(self, counters: dict[str, int]) -> None:
        call_with_timeout(self.replay.load_state_dict.remote(counters), self.rpc_timeout_s, "replay.load_state_dict")

    def replay_stats(self) -> dict[str, int]:
        return call_with_timeout(self.replay.stats.remote(), self.rpc_timeout_s, "replay.stats")

    def close(self) -> None:
        """Kill the actors without restart (a stuck worker stops generating; on a shared cluster
        they would outlive this process otherwise) and shut down a Ray this run started."""
        import ray

        for actor in [*self._workers, *([self._replay] if self._replay is not None else [])]:
            ray.kill(actor, no_restart=True)
        self._workers, self._replay = [], None
        if self._ray_started:
            ray.shutdown()
