"""The replay store between rollout workers and learners: bounded, version-tagged, fully counted.

:class:`ReplayBuffer` holds all the logic and is a plain class (tested without Ray);
:func:`make_replay_store_actor` wraps it as a Ray actor. Neither call blocks: an actor that slept
inside ``take`` would stop serving the ``put`` calls it waits for. Producers and the learner wait
on the client side instead, with :func:`put_blocking` and :func:`take_blocking`.

Back-pressure: ``put`` on a full buffer returns ``False`` and counts the attempt in
``rejected_full``; the producer backs off and retries (what :func:`put_blocking` does). A rejected
item was never stored, so it is not part of ``produced``.

Staleness: ``take(n, min_policy_version)`` first drops every stored item older than
``min_policy_version`` (counted in ``dropped_stale``), then returns the oldest fresh items that
total exactly ``n`` samples, or ``None`` when fewer are stored. The coordinator passes
``current_version - max_staleness``; with ``max_staleness = 0`` nothing from an older policy is
ever returned.

Accounting, in samples, holds after every call::

    produced == consumed + dropped_stale + lost_on_restore + in_store

``lost_on_restore`` is only non-zero after :meth:`ReplayBuffer.load_state_dict` restored counters
without the items they described (e.g. the store actor was restarted): those samples are gone,
and saying so keeps the books balanced instead of losing them silently.

Idempotent puts: a producer may pass a ``key`` (the coordinator uses ``(round, shard)``). A put
whose key this store already accepted, whether the item is still stored, was taken or was
dropped, stores nothing, returns ``True`` and counts one ``duplicates_ignored`` (put calls, like
``rejected_full``; neither is part of the sample identity). A worker killed after its put but
before answering is re-launched with the same shard, and its second put is such a duplicate, so
no rollout is counted twice. Keys are not saved by :meth:`ReplayBuffer.state_dict` (except those
of saved items): a resumed run regenerates its in-flight round under the same keys.

The actor (:func:`make_replay_store_actor`) restarts when its process dies, empty and with fresh
counters; the ``instance_id`` of :meth:`ReplayBuffer.inventory` changes, which is how the coordinator notices and
merges its last known counters back with :meth:`ReplayBuffer.load_state_dict`.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

COUNTERS = ("produced", "consumed", "dropped_stale", "lost_on_restore")


@dataclass
class ReplayItem:
    """One stored batch: the producer's object and what the store knows about it."""

    payload: Any
    policy_version: int
    num_samples: int
    num_bytes: int
    key: Any = None


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors inside ``obj`` (dataclasses, dicts, lists and tuples are searched)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def _leading_sizes(obj: Any) -> set[int]:
    if isinstance(obj, torch.Tensor):
        return {obj.shape[0]} if obj.dim() > 0 else set()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return set().union(*(_leading_sizes(getattr(obj, f.name)) for f in dataclasses.fields(obj)))
    if isinstance(obj, dict):
        return set().union(*(_leading_sizes(value) for value in obj.values()))
    return set()


def batch_size_of(obj: Any) -> int:
    """The shared leading dimension of the tensors in ``obj`` (a rollout batch's ``B``)."""
    sizes = _leading_sizes(obj)
    if len(sizes) != 1:
        raise ValueError(
            f"cannot infer num_samples: the tensors in {type(obj).__name__} have leading sizes "
            f"{sorted(sizes) or 'none'}; pass num_samples explicitly"
        )
    return sizes.pop()


class ReplayBuffer:
    """A FIFO of version-tagged rollout batches bounded by ``max_samples`` and ``max_bytes``."""

    def __init__(self, max_samples: int, max_bytes: int):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError(f"ReplayBuffer: max_samples and max_bytes must be >= 1, got {max_samples}, {max_bytes}")
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self._items: deque[ReplayItem] = deque()
        self._samples_in_store = 0
        self._bytes_in_store = 0
        self._samples = dict.fromkeys(COUNTERS, 0)
        self._rejected_full = 0
        self._duplicates_ignored = 0
        self._keys_accepted: set[Any] = set()
        self._instance_id = uuid.uuid4().hex

    def inventory(self) -> dict[str, Any]:
        """``instance_id``: a random id drawn when this store was created, which changes when the
        actor restarts; ``keys``: the keys of the items stored now (unkeyed ones left out)."""
        return {"instance_id": self._instance_id, "keys": [item.key for item in self._items if item.key is not None]}

    def put(self, payload: Any, policy_version: int, num_samples: int | None = None, key: Any = None) -> bool:
        """Store ``payload`` produced by policy ``policy_version``; ``False`` when it does not fit now.

        ``num_samples`` defaults to the leading dimension of the payload's tensors. A ``key`` this
        store already accepted makes the call a no-op that returns ``True`` (see the module docstring).

        Raises:
            ValueError: a bad version or size, or an item larger than the buffer could ever hold
                (retrying would never succeed).
        """
        if isinstance(policy_version, bool) or not isinstance(policy_version, int) or policy_version < 0:
            raise ValueError(f"ReplayBuffer.put: policy_version must be an int >= 0, got {policy_version!r}")
        num_samples = batch_size_of(payload) if num_samples is None else num_samples
        if num_samples < 1:
            raise ValueError(f"ReplayBuffer.put: num_samples must be >= 1, got {num_samples}")
        if key is not None and key in self._keys_accepted:
            self._duplicates_ignored += 1
            return True
        num_bytes = tensor_bytes(payload)
        if num_samples > self.max_samples or num_bytes > self.max_bytes:
            raise ValueError(
                f"ReplayBuffer.put: an item of {num_samples} samples / {num_bytes} bytes can never fit in a "
                f"buffer of {self.max_samples} samples / {self.max_bytes} bytes; raise runtime.replay_max_* "
                f"or ship smaller batches"
            )
        if (self._samples_in_store + num_samples > self.max_samples
                or self._bytes_in_store + num_bytes > self.max_bytes):
            self._rejected_full += 1
            return False
        self._append(ReplayItem(payload, policy_version, num_samples, num_bytes, key))
        self._samples["produced"] += num_samples
        return True

    def _append(self, item: ReplayItem) -> None:
        self._items.append(item)
        self._samples_in_store += item.num_samples
        self._bytes_in_store += item.num_bytes
        if item.key is not None:
            self._keys_accepted.add(item.key)

    def _pop_front(self) -> ReplayItem:
        item = self._items.popleft()
        self._samples_in_store -= item.num_samples
        self._bytes_in_store -= item.num_bytes
        return item

    def drop_stale(self, min_policy_version: int) -> int:
        """Discard items older than ``min_policy_version``; returns the samples dropped."""
        fresh = deque(item for item in self._items if item.policy_version >= min_policy_version)
        dropped = self._samples_in_store - sum(item.num_samples for item in fresh)
        self._items = fresh
        self._samples_in_store -= dropped
        self._bytes_in_store = sum(item.num_bytes for item in fresh)
        self._samples["dropped_stale"] += dropped
        return dropped

    def take(self, num_samples: int, min_policy_version: int = 0) -> list[ReplayItem] | None:
        """The oldest stored items, all from versions ``>= min_policy_version``, totalling exactly
        ``num_samples`` samples; ``None`` (nothing removed but stale items) when fewer are stored.

        Raises:
            ValueError: ``num_samples`` is not positive, or the oldest items' sizes step over it
                (producers must ship batches whose sizes add up to a round).
        """
        if num_samples < 1:
            raise ValueError(f"ReplayBuffer.take: num_samples must be >= 1, got {num_samples}")
        self.drop_stale(min_policy_version)
        if self._samples_in_store < num_samples:
            return None
        count, total = 0, 0
        for item in self._items:
            if total >= num_samples:
                break
            total += item.num_samples
            count += 1
        if total != num_samples:
            raise ValueError(
                f"ReplayBuffer.take: the oldest items hold {total} samples, not the {num_samples} asked for; "
                f"rollout batch sizes must add up to the round size"
            )
        taken = [self._pop_front() for _ in range(count)]
        self._samples["consumed"] += num_samples
        return taken

    def stats(self) -> dict[str, int]:
        """Sample counters, ``rejected_full`` and ``duplicates_ignored`` (put calls) and what is stored now."""
        return {
            **self._samples,
            "rejected_full": self._rejected_full,
            "duplicates_ignored": self._duplicates_ignored,
            "in_store_samples": self._samples_in_store,
            "in_store_bytes": self._bytes_in_store,
            "in_store_items": len(self._items),
        }

    def state_dict(self, include_items: bool = False) -> dict[str, Any]:
        """Counters (and, if asked, the stored items) for a checkpoint."""
        state: dict[str, Any] = {**self._samples, "rejected_full": self._rejected_full,
                                 "duplicates_ignored": self._duplicates_ignored,
                                 "in_store_samples": self._samples_in_store}
        if include_items:
            state["items"] = list(self._items)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Merge a saved state into this store: its counters are added to this store's, its items
        (if saved) are stored before the ones already here, and samples in store at save time
        whose items are not in ``state`` are counted as ``lost_on_restore``.

        Into a new store this is a plain restore. Merging is for a restarted store actor, which
        may already hold puts that reached it before the coordinator restored its counters.
        """
        missing = [key for key in (*COUNTERS, "rejected_full", "in_store_samples") if key not in state]
        if missing:
            raise ValueError(f"ReplayBuffer.load_state_dict: state lacks {', '.join(missing)}")
        current = list(self._items)
        self._items.clear()
        self._samples_in_store = self._bytes_in_store = 0
        restored = state.get("items", [])
        for item in [*restored, *current]:
            self._append(item)
        for key in COUNTERS:
            self._samples[key] += int(state[key])
        self._rejected_full += int(state["rejected_full"])
        self._duplicates_ignored += int(state.get("duplicates_ignored", 0))  # absent in older checkpoints
        self._samples["lost_on_restore"] += int(state["in_store_samples"]) - sum(item.num_samples for item in restored)


# Ray starts its worker processes at nice 15 (RAY_worker_niceness), so that stray tasks cannot starve
# the raylet and the driver. Our actors are not stray tasks: the rollout workers are the run's main
# compute and the store is on the learner's critical path. At nice 15 any process at the normal
# priority preempts them, and a worker's OpenMP threads then stall at every barrier of a decode
# step whose partner thread was descheduled: measured here (2 cores, another 2-thread job running),
# a worker generated a round in 48-103 s that the in-process loop generated in 32 s beside the same
# job. Every actor of the runtime asks for nice 0.
FOREGROUND_ACTOR = {"runtime_env": {"env_vars": {"RAY_worker_niceness": "0"}}}


def make_replay_store_actor(max_samples: int, max_bytes: int, name: str | None = None, max_restarts: int = -1):
    """A Ray actor around :class:`ReplayBuffer` (needs ``ray.init`` first). It takes no CPU slot:
    it only moves object references, and rollout workers need every slot.

    Ray restarts it (up to ``max_restarts`` times, -1 = always) empty; calls are never retried
    (``max_task_retries=0``): a call that reached the dead store fails, and the coordinator,
    which knows what the store held, restores it (see the module docstring)."""
    import ray

    actor_class = ray.remote(num_cpus=0, max_restarts=max_restarts, max_task_retries=0)(ReplayBuffer)
    options = {**FOREGROUND_ACTOR, **({"name": name} if name is not None else {})}
    return actor_class.options(**options).remote(max_samples, max_bytes)


def _caller(store: Any, method: str, rpc_timeout_s: float) -> Callable[..., Any]:
    """``store.method(...)`` for a local buffer, or the actor call resolved with a timeout."""
    bound = getattr(store, method)
    if not hasattr(bound, "remote"):
        return bound
    import ray

    def call(*args: Any) -> Any:
        try:
            return ray.get(bound.remote(*args), timeout=rpc_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"replay store did not answer {method} within {rpc_timeout_s:g} s") from None

    return call


def _poll(attempt: Callable[[], Any], timeout_s: float, poll_s: float, describe: Callable[[], str]) -> Any:
    """Call ``attempt`` until it returns something other than ``None``/``False``, or time out."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = attempt()
        if result is not None and result is not False:
            return result
        if time.monotonic() + poll_s > deadline:
            raise TimeoutError(describe())
        time.sleep(poll_s)


def take_blocking(store: Any, num_samples: int, min_policy_version: int, timeout_s: float,
                  poll_s: float = 0.05, rpc_timeout_s: float = 60.0) -> list[ReplayItem]:
    """:meth:`ReplayBuffer.take` on a buffer or store actor, polled until it succeeds.

    Raises:
        TimeoutError: not enough fresh samples arrived within ``timeout_s``; says how many were there.
    """
    take = _caller(store, "take", rpc_timeout_s)
    stats = _caller(store, "stats", rpc_timeout_s)
    return _poll(
        lambda: take(num_samples, min_policy_version), timeout_s, poll_s,
        lambda: (f"replay store: {num_samples} samples of policy version >= {min_policy_version} did not arrive "
                 f"within {timeout_s:g} s (stats: {stats()})"),
    )


def put_blocking(store: Any, payload: Any, policy_version: int, timeout_s: float, num_samples: int | None = None,
                 poll_s: float = 0.05, rpc_timeout_s: float = 60.0, key: Any = None) -> None:
    """:meth:`ReplayBuffer.put` (with ``key``), retried while the store is full.

    Raises:
        TimeoutError: the store stayed full for ``timeout_s`` (the learner is not consuming).
    """
    put = _caller(store, "put", rpc_timeout_s)
    stats = _caller(store, "stats", rpc_timeout_s)
    if hasattr(store.put, "remote"):
        import ray

        # Serialise once: each retry then ships a reference, which Ray resolves in the actor.
        payload = ray.put(payload)
    _poll(
        lambda: put(payload, policy_version, num_samples, key), timeout_s, poll_s,
        lambda: f"replay store stayed full for {timeout_s:g} s (stats: {stats()})",
    )
