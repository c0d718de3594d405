"""ReplayBuffer: bounds, FIFO and staleness, exact accounting (property test), resume, and the Ray actor."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm_rl.runtime.replay import (
    ReplayBuffer,
    batch_size_of,
    make_replay_store_actor,
    put_blocking,
    take_blocking,
    tensor_bytes,
)


@dataclasses.dataclass
class FakeRollout:
    """Stands in for ``rollout.sampler.Rollout``: tensors with a batch dimension, an optional one."""

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    teacher_dist_logprobs: torch.Tensor | None
    policy_version: int


def rollout(batch: int, version: int = 0, width: int = 4, vocab: int = 8) -> FakeRollout:
    return FakeRollout(
        response_ids=torch.zeros(batch, width, dtype=torch.long),
        response_mask=torch.ones(batch, width, dtype=torch.float32),
        teacher_dist_logprobs=torch.zeros(batch, width, vocab, dtype=torch.bfloat16),
        policy_version=version,
    )


def balanced(stats: dict) -> bool:
    return stats["produced"] == (stats["consumed"] + stats["dropped_stale"] + stats["lost_on_restore"]
                                 + stats["in_store_samples"])


def test_bytes_and_batch_size_of_nested_objects():
    item = rollout(3, width=4, vocab=8)
    assert tensor_bytes(item) == 3 * 4 * 8 + 3 * 4 * 4 + 3 * 4 * 8 * 2
    assert tensor_bytes({"a": [item, torch.zeros(5, dtype=torch.float64)], "b": "text"}) == tensor_bytes(item) + 40
    assert batch_size_of(item) == 3
    with pytest.raises(ValueError, match="leading sizes \\[2, 3\\]; pass num_samples explicitly"):
        batch_size_of({"a": torch.zeros(2), "b": torch.zeros(3)})


def test_bounded_by_samples():
    buffer = ReplayBuffer(max_samples=5, max_bytes=10**9)
    assert buffer.put(rollout(3), 0)
    assert not buffer.put(rollout(3), 0)
    assert buffer.put(rollout(2), 0)
    assert not buffer.put(rollout(1), 0)
    stats = buffer.stats()
    assert (stats["in_store_samples"], stats["rejected_full"], stats["produced"]) == (5, 2, 5)
    with pytest.raises(ValueError, match="can never fit"):
        buffer.put(rollout(6), 0)


def test_bounded_by_bytes():
    item_bytes = tensor_bytes(rollout(1))
    buffer = ReplayBuffer(max_samples=100, max_bytes=2 * item_bytes)
    assert buffer.put(rollout(1), 0) and buffer.put(rollout(1), 0)
    assert not buffer.put(rollout(1), 0)
    assert buffer.stats()["in_store_bytes"] == 2 * item_bytes
    buffer.take(1)
    assert buffer.put(rollout(1), 0)
    with pytest.raises(ValueError, match="can never fit"):
        buffer.put(rollout(3), 0)


@pytest.mark.parametrize("version", [-1, 1.0, True, None])
def test_bad_version_is_refused(version):
    with pytest.raises(ValueError, match="policy_version must be an int >= 0"):
        ReplayBuffer(10, 10**9).put(rollout(1), version)


def test_take_is_fifo_exact_and_all_or_nothing():
    buffer = ReplayBuffer(max_samples=100, max_bytes=10**9)
    for tag, size in enumerate([2, 2, 4]):
        buffer.put({"tag": tag, "x": torch.zeros(size)}, 0)
    assert buffer.take(9) is None
    assert buffer.stats()["in_store_samples"] == 8  # a failed take removes nothing
    first = buffer.take(4)
    assert [item.payload["tag"] for item in first] == [0, 1]
    assert sum(item.num_samples for item in first) == 4
    with pytest.raises(ValueError, match="oldest items hold 4 samples, not the 3 asked for"):
        buffer.take(3)
    assert [item.payload["tag"] for item in buffer.take(4)] == [2]


def test_strictly_on_policy_never_returns_an_older_version():
    """max_staleness = 0: the coordinator asks for min_policy_version = current version."""
    buffer = ReplayBuffer(max_samples=100, max_bytes=10**9)
    buffer.put(rollout(4, version=0), 0)
    buffer.put(rollout(4, version=1), 1)
    buffer.put(rollout(2, version=0), 0)  # a slow worker still on version 0
    assert buffer.take(8, min_policy_version=1) is None
    stats = buffer.stats()
    assert (stats["dropped_stale"], stats["in_store_samples"]) == (6, 4)
    taken = buffer.take(4, min_policy_version=1)
    assert [item.policy_version for item in taken] == [1]
    assert [item.payload.policy_version for item in taken] == [1]
    assert balanced(buffer.stats())


def test_staleness_one_keeps_the_previous_version():
    buffer = ReplayBuffer(max_samples=100, max_bytes=10**9)
    for version in (0, 1, 2):
        buffer.put(rollout(2, version), version)
    taken = buffer.take(4, min_policy_version=2 - 1)
    assert [item.policy_version for item in taken] == [1, 2]
    assert buffer.stats()["dropped_stale"] == 2


operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(1, 4), st.integers(0, 5), st.one_of(st.none(), st.integers(0, 5))),
        st.tuples(st.just("take"), st.integers(1, 8), st.integers(0, 5), st.none()),
        st.tuples(st.just("restore"), st.booleans(), st.just(0), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_accounting_balances_under_any_sequence(ops):
    """produced == consumed + dropped_stale + lost_on_restore + in_store after every call, take
    returns exactly the oldest fresh items, and a keyed put is stored at most once per store
    (checked against a list model)."""
    buffer = ReplayBuffer(max_samples=12, max_bytes=10**9)
    model: list[tuple[int, int, int]] = []  # (tag, version, size) in arrival order
    accepted_keys: set[int] = set()
    keys_of: dict[int, int] = {}  # tag -> key
    duplicates = 0
    for tag, (op, a, b, key) in enumerate(ops):
        if op == "put":
            stored = buffer.put({"tag": tag, "x": torch.zeros(a)}, b, key=key)
            if key is not None and key in accepted_keys:
                duplicates += 1
                assert stored
            else:
                assert stored == (sum(size for _, _, size in model) + a <= 12)
                if stored:
                    model.append((tag, b, a))
                    if key is not None:
                        accepted_keys.add(key)
                        keys_of[tag] = key
        elif op == "take":
            model = [entry for entry in model if entry[1] >= b]
            prefix_sizes = [size for _, _, size in model]
            try:
                taken = buffer.take(a, min_policy_version=b)
            except ValueError:
                assert a in range(1, sum(prefix_sizes) + 1)
                assert a not in {sum(prefix_sizes[:k]) for k in range(len(prefix_sizes) + 1)}
                taken = None
            else:
                if sum(prefix_sizes) < a:
                    assert taken is None
                else:
                    expected = model[: len(taken)]
                    assert [item.payload["tag"] for item in taken] == [tag_ for tag_, _, _ in expected]
                    assert all(item.policy_version >= b for item in taken)
                    assert sum(item.num_samples for item in taken) == a
                    model = model[len(taken):]
        else:
            state = buffer.state_dict(include_items=a)
            buffer = ReplayBuffer(max_samples=12, max_bytes=10**9)
            buffer.load_state_dict(state)
            if not a:
                model = []
            # A new store knows only the keys of the items it was given.
            accepted_keys = {keys_of[tag_] for tag_, _, _ in model if tag_ in keys_of}
        stats = buffer.stats()
        assert stats["duplicates_ignored"] == duplicates
        assert balanced(stats), stats
        assert stats["in_store_samples"] == sum(size for _, _, size in model)


def test_state_dict_round_trip_and_loss_on_restore():
    buffer = ReplayBuffer(max_samples=10, max_bytes=10**9)
    buffer.put(rollout(3), 0)
    buffer.put(rollout(3), 0)
    buffer.put(rollout(5), 0)  # rejected: full
    buffer.take(3)
    with_items = ReplayBuffer(max_samples=10, max_bytes=10**9)
    with_items.load_state_dict(buffer.state_dict(include_items=True))
    assert with_items.stats() == buffer.stats()
    counters_only = ReplayBuffer(max_samples=10, max_bytes=10**9)
    counters_only.load_state_dict(buffer.state_dict())
    stats = counters_only.stats()
    assert (stats["produced"], stats["consumed"], stats["rejected_full"]) == (6, 3, 1)
    assert (stats["lost_on_restore"], stats["in_store_samples"]) == (3, 0)
    assert balanced(stats)
    with pytest.raises(ValueError, match="state lacks consumed"):
        counters_only.load_state_dict({"produced": 1})


def test_keyed_put_is_stored_once_even_after_it_was_taken_or_dropped():
    buffer = ReplayBuffer(max_samples=10, max_bytes=10**9)
    assert buffer.put(rollout(4), 1, key=(0, 0)) and buffer.put(rollout(4), 1, key=(0, 0))  # a re-launched shard
    assert buffer.stats()["in_store_samples"] == 4
    buffer.take(4, min_policy_version=1)
    assert buffer.put(rollout(4), 1, key=(0, 0))  # already handed out: still ignored
    assert buffer.put(rollout(4), 0, key=(0, 1))
    assert buffer.take(4, min_policy_version=1) is None  # drops (0, 1) as stale
    assert buffer.put(rollout(4), 0, key=(0, 1))
    stats = buffer.stats()
    assert (stats["produced"], stats["consumed"], stats["dropped_stale"], stats["duplicates_ignored"]) == (8, 4, 4, 3)
    assert balanced(stats) and stats["in_store_samples"] == 0


def test_restarted_store_merges_the_saved_counters_with_what_it_already_holds():
    """A restarted store actor may receive puts before the coordinator restores it: they stay,
    counted once, next to the saved counters; what the dead store held is lost."""
    before = ReplayBuffer(max_samples=10, max_bytes=10**9)
    before.put(rollout(3), 0, key=(0, 0))
    before.take(3)
    before.put(rollout(2), 1, key=(1, 0))  # in the store when it dies
    saved = before.state_dict()
    restarted = ReplayBuffer(max_samples=10, max_bytes=10**9)
    restarted.put(rollout(2), 1, key=(1, 1))
    assert restarted.inventory()["instance_id"] != before.inventory()["instance_id"]
    restarted.load_state_dict(saved)
    stats = restarted.stats()
    assert (stats["produced"], stats["consumed"], stats["lost_on_restore"], stats["in_store_samples"]) == (7, 3, 2, 2)
    assert balanced(stats) and restarted.inventory()["keys"] == [(1, 1)]
    assert restarted.put(rollout(2), 1, key=(1, 1)) and restarted.stats()["duplicates_ignored"] == 1
    assert restarted.put(rollout(2), 1, key=(1, 0))  # lost with the dead store: regenerated and stored
    assert [item.key for item in restarted.take(4, 1)] == [(1, 1), (1, 0)]


def test_blocking_helpers_time_out_with_a_clear_error():
    buffer = ReplayBuffer(max_samples=4, max_bytes=10**9)
    put_blocking(buffer, rollout(4), 0, timeout_s=1.0)
    with pytest.raises(TimeoutError, match="replay store stayed full for 0.1 s"):
        put_blocking(buffer, rollout(1), 0, timeout_s=0.1, poll_s=0.02)
    with pytest.raises(TimeoutError, match="8 samples of policy version >= 0 did not arrive within 0.1 s"):
        take_blocking(buffer, 8, 0, timeout_s=0.1, poll_s=0.02)
    assert len(take_blocking(buffer, 4, 0, timeout_s=1.0)) == 1


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_store_actor_end_to_end(local_ray):
    # Plain dicts: a class defined in this test module cannot be unpickled inside the actor.
    def batch(version: int) -> dict:
        return dataclasses.asdict(rollout(4, version))

    store = make_replay_store_actor(max_samples=8, max_bytes=10**9)
    # On the learner's critical path: the normal priority, not Ray's nice 15 for worker processes.
    assert local_ray.get(store.__ray_call__.remote(lambda _: os.nice(0)), timeout=30) == os.nice(0)
    put_blocking(store, batch(0), 0, timeout_s=30)
    put_blocking(store, batch(1), 1, timeout_s=30)
    assert local_ray.get(store.put.remote(batch(1), 1), timeout=30) is False  # full: the producer backs off
    taken = take_blocking(store, 4, min_policy_version=1, timeout_s=30)
    assert [(item.policy_version, item.payload["policy_version"]) for item in taken] == [(1, 1)]
    assert torch.equal(taken[0].payload["response_mask"], torch.ones(4, 4))
    with pytest.raises(TimeoutError, match="did not arrive within 0.2 s"):
        take_blocking(store, 4, min_policy_version=1, timeout_s=0.2, poll_s=0.05)
    stats = local_ray.get(store.stats.remote(), timeout=30)
    assert (stats["produced"], stats["consumed"], stats["dropped_stale"], stats["rejected_full"]) == (8, 4, 4, 1)
    assert balanced(stats)
    local_ray.kill(store)
