"""Rank 0's side of rollout generation: weight sync, a round's shards, and recovery from faults.

About 400 lines because every recovery path below shares the shard bookkeeping and the store
mirror; split off first, if it grows: the weight publishing (``sync``/``publish``).

:class:`RolloutClient` talks to the rollout worker actors and the replay store actor; it knows
nothing about the training run (the coordinator passes the shards, seeds and a weights source).
:func:`generate_texts_on_workers` runs the coordinator's validation generation on the same workers.

What it survives, and how:

- **A worker killed mid-round.** ``generate_into`` is launched with ``max_task_retries=0``: Ray
  would retry it on the restarted actor, which is at version -1 and must refuse it; so the
  client, not Ray, re-launches. It waits for the restarted actor (Ray re-runs its constructor,
  reloading teacher and student), sends it the current weights, and launches the *same* shard
  with the *same* seed (the same rollout when the version did not move). At most
  ``max_relaunches`` per shard, then :class:`~minillm_rl.errors.RunFailed`.
- **A worker killed after its put, before answering.** Every put carries the key ``(round,
  shard)``; the store ignores a key it already accepted (``duplicates_ignored``), so the
  re-launched shard is not counted twice.
- **The replay store killed.** Ray restarts it empty (calls to it are not retried). The client
  notices (a store call fails, or the store's ``instance_id`` changed),
  merges back the counters it mirrored after the last take, counts the samples of the shards it
  had been told were stored and the store no longer holds as ``produced`` and
  ``lost_on_restore``, and re-launches those shards (same seeds). So over the run::

      produced == consumed + dropped_stale + lost_on_restore + in_store

  still holds, where ``produced`` counts a regenerated shard once per time it was stored and
  ``lost_on_restore`` the copies the dead store took with it.
- **A stuck worker.** Every shard has ``rpc_timeout_s`` from its launch (or from the start of the
  wait, for a round launched ahead); past it, ``TimeoutError`` names the worker, the call, the
  round and the shard. The caller shuts the actors down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from minillm_rl.errors import RunFailed
from minillm_rl.runtime.replay import COUNTERS, ReplayItem
from minillm_rl.algorithm.sampler import SamplingConfig
from minillm_rl.runtime.rollout.worker import (
    ActorDied,
    ShardReport,
    StaleWeights,
    await_weight_loads,
    broadcast_student_weights,
    call_with_timeout,
    publish_student_weights,
)

# Between polls of an actor that Ray is restarting.
_RESTART_POLL_S = 0.2


@dataclass
class _Shard:
    """One ``generate_into`` call of a round and its attempts so far."""

    round_index: int
    index: int
    prompts: list[list[int]]
    seed: int
    worker: int
    relaunches: int = 0
    ref: Any = None
    launched_at: float = 0.0

    @property
    def key(self) -> tuple[int, int]:
        return (self.round_index, self.index)


def wait_for_restart(call: Callable[[], Any], what: str, timeout_s: float) -> Any:
    """``call()``, retried while the actor it talks to is dead and being restarted."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except (ActorDied, ray.exceptions.RayActorError):
            if time.monotonic() + _RESTART_POLL_S > deadline:
                raise RunFailed(f"{what}: the actor did not come back within {timeout_s:g} s") from None
            time.sleep(_RESTART_POLL_S)


def sync_workers(workers: Sequence[Any], names: Sequence[str], model: Any, version: int, rpc_timeout_s: float,
                 weight_sync_timeout_s: float) -> None:
    """Bring ``workers`` to weights ``model`` tagged ``version``; only those holding another
    version (after an update, or a restart) get the weights."""
    versions = [wait_for_restart(lambda w=worker, n=name: call_with_timeout(
        w.policy_version.remote(), rpc_timeout_s, f"{n}.policy_version"), name, rpc_timeout_s)
        for worker, name in zip(workers, names)]
    behind = [i for i, held in enumerate(versions) if held != version]
    if behind:
        broadcast_student_weights([workers[i] for i in behind], model, version, weight_sync_timeout_s,
                                  names=[names[i] for i in behind])


class WorkerCalls:
    """``method(*arguments)`` on the workers, call ``i`` on worker ``i % len(workers)``, submitted
    now and collected by :meth:`results`. For calls whose result depends only on their arguments
    and the frozen teacher (teacher scoring, teacher sampling): a call whose worker died is made
    again on the restarted actor, at most ``max_relaunches`` times per call."""

    def __init__(self, workers: Sequence[Any], method: str, argument_lists: Sequence[tuple], timeout_s: float,
                 what: str, names: Sequence[str] | None = None, max_relaunches: int = 3):
        self.workers, self.method, self.argument_lists = list(workers), method, list(argument_lists)
        self.timeout_s, self.what, self.max_relaunches = timeout_s, what, max_relaunches
        self.names = list(names) if names is not None else [f"rollout-worker-{i}" for i in range(len(self.workers))]
        self.relaunches = 0
        self._refs = [self._submit(i) for i in range(len(self.argument_lists))]

    def _submit(self, index: int) -> Any:
        actor_method = getattr(self.workers[index % len(self.workers)], self.method)
        return actor_method.options(max_task_retries=0).remote(*self.argument_lists[index])

    def results(self) -> list[Any]:
        """Every call's result, in call order."""
        import ray

        results = []
        for index, ref in enumerate(self._refs):
            name = f"{self.names[index % len(self.workers)]}.{self.method} ({self.what}, call {index})"
            for attempt in range(self.max_relaunches + 1):
                try:
                    results.append(call_with_timeout(ref, self.timeout_s, name))
                    break
                except (ActorDied, ray.exceptions.RayActorError) as err:
                    if attempt == self.max_relaunches:
                        raise RunFailed(f"{name} failed {attempt + 1} times; last: {err}") from None
                    self.relaunches += 1
                    ref = self._submit(index)
        return results


def generate_texts_on_workers(workers: Sequence[Any], shards: Sequence[list[list[int]]], seeds: Sequence[int],
                              eval_cfg: Any, model: Any, version: int, rpc_timeout_s: float,
                              weight_sync_timeout_s: float, names: Sequence[str] | None = None,
                              max_relaunches: int = 3) -> list[list[str]]:
    """Validation generation on the rollout workers: shard ``i`` (prompt id lists) is sampled by
    worker ``i % len(workers)`` with ``seeds[i]`` (``evaluation.generate_responses``) from weights
    ``model``, pushed first as ``version`` to the workers not holding it. A worker that dies is
    re-synced and runs its shard again with the same seed (at most ``max_relaunches`` times).

    Returns:
        The texts of each shard, in shard order.
    """
    import ray

    names = list(names) if names is not None else [f"rollout-worker-{i}" for i in range(len(workers))]
    sync_workers(workers, names, model, version, rpc_timeout_s, weight_sync_timeout_s)
    texts: list[list[str]] = []
    for index, (prompts, seed) in enumerate(zip(shards, seeds)):
        worker = index % len(workers)
        texts.append([])
        for attempt in range(max_relaunches + 1):
            ref = workers[worker].generate_for_eval.options(max_task_retries=0).remote(prompts, eval_cfg, seed,
                                                                                      version)
            try:
                texts[-1] = call_with_timeout(ref, rpc_timeout_s, f"{names[worker]}.generate_for_eval(shard {index})")
                break
            except (ActorDied, ray.exceptions.RayActorError, StaleWeights) as err:  # died, maybe restarted
                if attempt == max_relaunches:
                    raise RunFailed(f"{names[worker]}.generate_for_eval(shard {index}) failed {attempt + 1} times; "
                                    f"last: {err}") from None
                sync_workers([workers[worker]], [names[worker]], model, version, rpc_timeout_s, weight_sync_timeout_s)
    return texts


def _counters_only(state: dict[str, Any]) -> dict[str, int]:
    return {key: int(state.get(key, 0)) for key in (*COUNTERS, "rejected_full", "duplicates_ignored",
                                                    "in_store_samples")}


@dataclass
class TakenRound:
    """How a round came in: ``reports``, per shard, the worker index and the
    :class:`~minillm_rl.runtime.rollout.worker.ShardReport` of the attempt that stored it;
    ``wait_s``, the seconds :meth:`RolloutClient.take_round` waited for generation (recoveries
    included); ``take_s``, the seconds the store's ``take`` took (serialising the items out of
    the store and into this process)."""

    reports: list[tuple[int, ShardReport]]
    wait_s: float
    take_s: float

    def worker_seconds(self, num_workers: int) -> dict[str, float]:
        """``time/worker_<stage>``: each stage's seconds over the round's shards, per worker
        (summed, divided by ``num_workers``); ``time/worker_busy``: the busiest worker's total;
        ``time/worker_<model>_forwards``: each model's forward calls per rollout (per shard, mean)."""
        busy = [0.0] * num_workers
        stages: dict[str, float] = {}
        calls: dict[str, int] = {}
        for worker, report in self.reports:
            busy[worker] += report.busy_seconds
            for stage, seconds in report.seconds.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
            for model, count in report.forward_calls.items():
                calls[model] = calls.get(model, 0) + count
        return {**{f"time/worker_{stage}": seconds / num_workers for stage, seconds in stages.items()},
                "time/worker_busy": max(busy),
                **{f"time/worker_{model}_forwards": count / len(self.reports) for model, count in calls.items()}}


class RolloutClient:
    """Launches rounds on ``workers`` into ``store`` and assembles them, surviving worker and
    store restarts (see the module docstring).

    Args:
        workers: rollout worker actor handles (:func:`~minillm_rl.runtime.rollout.worker.make_rollout_worker`).
        store: the replay store actor (:func:`~minillm_rl.runtime.replay.make_replay_store_actor`).
        sampling: the sampling settings of every round.
        current_weights: returns ``(model or payload, version)``, the learner's current student.
        rpc_timeout_s: limit of every actor call and of each shard attempt.
        weight_sync_timeout_s: limit of one weight broadcast.
        names: the workers' names in error messages (default ``rollout-worker-<i>``).
        max_relaunches: re-launches allowed per shard (and store recoveries per round).
    """

    def __init__(self, workers: Sequence[Any], store: Any, sampling: SamplingConfig,
                 current_weights: Callable[[], tuple[Any, int]], rpc_timeout_s: float,
                 weight_sync_timeout_s: float, names: Sequence[str] | None = None, max_relaunches: int = 3):
        self.workers, self.store, self.sampling = list(workers), store, sampling
        self.current_weights = current_weights
        self.rpc_timeout_s, self.weight_sync_timeout_s = rpc_timeout_s, weight_sync_timeout_s
        self.names = list(names) if names is not None else [f"rollout-worker-{i}" for i in range(len(self.workers))]
        self.max_relaunches = max_relaunches
        self.pending_round: int | None = None
        self._shards: dict[tuple[int, int], _Shard] = {}
        self._running: dict[tuple[int, int], _Shard] = {}
        # The shards' reports of the round in flight (the attempt that stored it).
        self._reports: dict[tuple[int, int], ShardReport] = {}
        self.last_round: TakenRound | None = None
        # Per worker: the version last sent to it (None: unknown, e.g. after a restart) and the
        # loads published without waiting, (version, checksum, reference), not yet confirmed.
        self._sent_version: list[int | None] = [None] * len(self.workers)
        self._unconfirmed: dict[int, tuple[int, str, Any]] = {}
        # Samples per shard the store said it stored, since the mirror below was taken.
        self._stored: dict[tuple[int, int], int] = {}
        self._mirror: dict[str, int] = {}
        self._lost_since_mirror = 0
        self._store_id = self._store_call("inventory")["instance_id"]
        self._take_mirror()
        self.relaunches = 0
        self.store_recoveries = 0

    # ---- actor calls --------------------------------------------------------------------------

    def _store_call(self, method: str, *args: Any) -> Any:
        return call_with_timeout(getattr(self.store, method).remote(*args), self.rpc_timeout_s, f"replay store.{method}")

    def _take_mirror(self) -> None:
        self._mirror = _counters_only(self._store_call("state_dict"))
        self._stored.clear()
        self._lost_since_mirror = 0

    # ---- weights ------------------------------------------------------------------------------

    def sync(self, indices: Sequence[int] | None = None) -> None:
        """Bring workers ``indices`` (default all) to the learner's version and wait until they
        hold it; only those at another version (after an update, or a restart) get the weights.
        Waits behind a worker's in-flight generation: for start-up and recovery, not rounds."""
        indices = list(range(len(self.workers)) if indices is None else indices)
        self._confirm_loads(indices)
        model, version = self.current_weights()
        sync_workers([self.workers[i] for i in indices], [self.names[i] for i in indices], model, version,
                     self.rpc_timeout_s, self.weight_sync_timeout_s)
        for i in indices:
            self._sent_version[i] = version

    def publish(self) -> None:
        """Send the learner's version to every worker not known to hold it, without waiting:
        each worker loads it after its in-flight generation and before the next one launched
        from here (:func:`~minillm_rl.runtime.rollout.worker.publish_student_weights`). The loads
        are confirmed by the next :meth:`publish` or :meth:`sync`, or when a generation refuses
        its version."""
        self._confirm_loads(list(self._unconfirmed))
        model, version = self.current_weights()
        behind = [i for i, sent in enumerate(self._sent_version) if sent != version]
        if not behind:
            return
        checksum, refs = publish_student_weights([self.workers[i] for i in behind], model, version)
        for i, ref in zip(behind, refs):
            self._unconfirmed[i] = (version, checksum, ref)
            self._sent_version[i] = version

    def _confirm_loads(self, indices: Sequence[int]) -> None:
        """Wait for the published loads of workers ``indices``; a worker that died meanwhile is
        marked as holding an unknown version (its restart is handled where its calls fail)."""
        for i in indices:
            if i not in self._unconfirmed:
                continue
            version, checksum, ref = self._unconfirmed.pop(i)
            try:
                await_weight_loads([ref], checksum, version, self.weight_sync_timeout_s, [self.names[i]])
            except ActorDied:
                self._sent_version[i] = None

    # ---- rounds -------------------------------------------------------------------------------

    def launch(self, round_index: int, shards: Sequence[list[list[int]]], seeds: Sequence[int]) -> None:
        """Shard ``i`` (prompt id lists) is generated by worker ``i % len(workers)`` with ``seeds[i]``
        and the learner's current version (call :meth:`publish` or :meth:`sync` first), into the store."""
        if self.pending_round is not None:
            raise RuntimeError(f"round {round_index} launched while round {self.pending_round} is in flight")
        self.pending_round = round_index
        self._shards = {(round_index, i): _Shard(round_index, i, list(prompts), seed, i % len(self.workers))
                        for i, (prompts, seed) in enumerate(zip(shards, seeds))}
        self._reports.clear()
        _, version = self.current_weights()
        for shard in self._shards.values():
            self._submit(shard, version)

    def _submit(self, shard: _Shard, version: int) -> None:
        worker = self.workers[shard.worker]
        shard.ref = worker.generate_into.options(max_task_retries=0).remote(
            self.store, shard.prompts, self.sampling, shard.seed, version, self.rpc_timeout_s, shard.key)
        shard.launched_at = time.monotonic()
        self._running[shard.key] = shard

    def _describe(self, shard: _Shard) -> str:
        return f"{self.names[shard.worker]}.generate_into(round {shard.round_index}, shard {shard.index})"

    def _relaunch(self, shard: _Shard, why: str) -> None:
        """The same shard and seed again, on its worker once it is back at the current version."""
        if shard.relaunches >= self.max_relaunches:
            raise RunFailed(f"{self._describe(shard)} failed {shard.relaunches + 1} times; last: {why}")
        shard.relaunches += 1
        self.relaunches += 1
        self.sync([shard.worker])
        self._submit(shard, self.current_weights()[1])

    def _wait_shards(self) -> None:
        """Until every launched shard is stored; re-launches the ones whose actor died."""
        import ray

        started = time.monotonic()
        while self._running:
            by_ref = {shard.ref: shard for shard in self._running.values()}
            deadline = min(max(started, shard.launched_at) for shard in by_ref.values()) + self.rpc_timeout_s
            ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                overdue = min(by_ref.values(), key=lambda shard: max(started, shard.launched_at))
                raise TimeoutError(f"{self._describe(overdue)} did not finish within {self.rpc_timeout_s:g} s")
            shard = by_ref[ready[0]]
            del self._running[shard.key]
            try:
                report = ray.get(ready[0])
                self._reports[shard.key] = report
                self._stored[shard.key] = report.num_samples
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, StaleWeights):
                    self._confirm_loads([shard.worker])  # a refused load says more than the stale version
                if not isinstance(err.cause, ray.exceptions.RayActorError):
                    raise err.cause if isinstance(err.cause, Exception) else err from None
                self._reconcile_store()  # waits for the restarted store, re-launches what it lost
                self._relaunch(shard, "the replay store died under its put")
            except ray.exceptions.RayActorError as err:
                self._relaunch(shard, f"the worker died ({type(err).__name__})")

    def _reconcile_store(self) -> bool:
        """Restore a restarted store and re-launch the shards it lost; whether anything was lost."""
        inventory = wait_for_restart(lambda: self._store_call("inventory"), "replay store", self.rpc_timeout_s)
        restarted = inventory["instance_id"] != self._store_id
        held = set(map(tuple, inventory["keys"]))
        lost_keys = [key for key in self._stored if key not in held]
        lost = sum(self._stored.pop(key) for key in lost_keys)
        self._lost_since_mirror += lost
        if restarted or lost:
            # Merged into the store: the lost shards were produced once and are gone.
            state = dict(self._mirror) if restarted else dict.fromkeys(self._mirror, 0)
            extra = self._lost_since_mirror if restarted else lost
            state["produced"] += extra
            state["in_store_samples"] += extra
            self._store_id = inventory["instance_id"]
            self._store_call("load_state_dict", state)
            self.store_recoveries += 1
        for key in lost_keys:
            self._relaunch(self._shards[key], "the replay store restarted and lost it")
        return restarted or bool(lost_keys)

    def take_round(self, round_index: int, num_samples: int, min_policy_version: int) -> list[ReplayItem]:
        """Wait for round ``round_index`` and take its ``num_samples`` samples (versions
        ``>= min_policy_version``) from the store, recovering lost shards first."""
        if self.pending_round != round_index:
            raise RuntimeError(f"round {round_index} was never launched (pending: {self.pending_round})")
        waited = taking = 0.0
        for _ in range(self.max_relaunches + 1):
            started = time.perf_counter()
            self._wait_shards()
            waited += time.perf_counter() - started
            started = time.perf_counter()
            try:
                if self._reconcile_store():
                    continue
                items = self._store_call("take", num_samples, min_policy_version)
            except ActorDied:
                continue  # the store died under the call: reconciled on the next pass
            finally:
                taking += time.perf_counter() - started
            if items is not None:
                self.pending_round = None
                self._take_mirror()
                self.last_round = TakenRound([(self._shards[key].worker, report)
                                              for key, report in sorted(self._reports.items())], waited, taking)
                self._reports.clear()
                return items
        raise RunFailed(f"round {round_index}: the replay store could not deliver {num_samples} samples of version "
                        f">= {min_policy_version} after {self.max_relaunches + 1} attempts "
                        f"(stats: {self._store_call('stats')})")

    def replay_stats(self) -> dict[str, int]:
        """The store's counters plus this client's ``relaunches`` and ``store_recoveries``."""
        return {**self._store_call("stats"), "relaunches": self.relaunches, "store_recoveries": self.store_recoveries}
