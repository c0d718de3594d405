"""Per-round role profile and the rollout-workers-per-learner advice (minillm_rl/runtime/balance.py)."""

from __future__ import annotations

import json

import pytest

from minillm_rl.runtime.balance import advice_from_run, balance_advice, measured_rates, round_profile
from minillm_rl.runtime.rollout.client import TakenRound
from minillm_rl.runtime.rollout.worker import ShardReport


def test_advice_balances_generation_against_learning():
    # A worker makes 0.5 samples/s, two learner ranks learn 1.6 samples/s together: 3.2 workers keep
    # pace, so 4 (2 per learner); with 3 the 16-sample round is generation-bound.
    advice = balance_advice(worker_samples_per_s=0.5, learner_samples_per_s=1.6, num_learners=2)
    assert advice.balanced_workers == pytest.approx(3.2)
    assert advice.recommended_workers == 4 and advice.workers_per_learner == 2
    assert advice.round_seconds(4, 16, overlapped=True) == pytest.approx(16 / 1.6)  # learning-bound
    assert advice.round_seconds(3, 16, overlapped=True) == pytest.approx(16 / 1.5)  # generation-bound
    assert advice.round_seconds(4, 16, overlapped=False) == pytest.approx(16 / 2.0 + 16 / 1.6)
    # With the recommendation the learners never wait: generation is no slower than learning.
    assert 16 / (advice.recommended_workers * 0.5) <= 16 / 1.6
    assert 16 / ((advice.recommended_workers - 1) * 0.5) > 16 / 1.6
    assert "use 4 (2 per learner)" in advice.summary() and "generation is the slower role" in advice.summary(3)


def test_advice_on_exact_ratios_and_fast_workers():
    assert balance_advice(0.1, 0.3, 1).recommended_workers == 3  # 0.3 / 0.1 is 2.9999999999999996
    assert balance_advice(2.0, 1.0, 1).recommended_workers == 1  # one is the least
    assert balance_advice(1.0, 3.0000001, 1).recommended_workers == 4
    with pytest.raises(ValueError, match="rates must be > 0"):
        balance_advice(0.0, 1.0, 1)
    with pytest.raises(ValueError, match="num_learners must be >= 1"):
        balance_advice(1.0, 1.0, 0)


def test_round_profile_splits_roles():
    timings = {"time/sync": 0.5, "time/transfer": 0.25, "time/learn": 4.0, "time/wait_rollout": 6.0,
               "time/worker_generate": 9.0, "time/worker_busy": 10.0}
    profile = round_profile(timings, 11.0)
    assert profile["time/round"] == 11.0
    assert profile["time/learner_busy"] == pytest.approx(4.75) and profile["time/learner_wait"] == 6.0
    assert profile["time/worker_idle"] == pytest.approx(1.0)
    # A worker busier than the round (its generation straddles two rounds) is not idle.
    assert round_profile({**timings, "time/worker_busy": 12.0}, 11.0)["time/worker_idle"] == 0.0
    assert "time/worker_idle" not in round_profile({"time/learn": 1.0}, 1.0)  # no workers: no worker times


def test_worker_seconds_per_worker_and_busiest():
    taken = TakenRound([(0, ShardReport(4, {"generate": 6.0, "put": 1.0, "weight_load": 0.5})),
                        (1, ShardReport(4, {"generate": 4.0, "put": 1.0, "weight_load": 0.5})),
                        (0, ShardReport(2, {"generate": 2.0, "put": 0.5, "weight_load": 0.0}))], 1.0, 0.5)
    seconds = taken.worker_seconds(num_workers=2)
    assert seconds["time/worker_generate"] == pytest.approx(6.0) and seconds["time/worker_put"] == pytest.approx(1.25)
    assert seconds["time/worker_busy"] == pytest.approx(10.0)  # worker 0: 7.5 + 2.5


def _round(worker_busy, learner_busy):
    return {"stage": "minillm", "time/round": 1.0, "time/worker_busy": worker_busy, "time/learner_busy": learner_busy}


def test_measured_rates_skip_the_first_round():
    rounds = [_round(100.0, 100.0), _round(8.0, 2.0), _round(8.0, 6.0)]
    worker, learner = measured_rates(rounds, num_rollouts=16, num_workers=2)
    assert worker == pytest.approx(8 * 2 / 16) and learner == pytest.approx(16 * 2 / 8)
    assert measured_rates(rounds[:1], 16, 2) == pytest.approx((8 / 100, 16 / 100))  # one round: kept
    with pytest.raises(ValueError, match="time/worker_busy and time/learner_busy"):
        measured_rates([{"stage": "minillm", "time/round": 1.0}], 16, 2)


def test_advice_from_a_run_directory(tmp_path):
    from minillm_rl.config import RunConfig

    cfg = RunConfig()
    cfg.model.teacher, cfg.model.student, cfg.data.train = "teacher-dir", "student-dir", "sharegpt"
    cfg.train.num_rollouts, cfg.runtime.num_rollout_workers, cfg.runtime.num_learners = 16, 2, 1
    cfg.save(tmp_path / "config.yaml")
    records = [{"stage": "sft", "step": 1, "loss": 1.0}, _round(9.0, 9.0), _round(8.0, 4.0), _round(8.0, 4.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    advice, workers = advice_from_run(tmp_path)
    assert workers == 2 and advice.worker_samples_per_s == pytest.approx(1.0)
    assert advice.learner_samples_per_s == pytest.approx(4.0) and advice.recommended_workers == 4
    (tmp_path / "metrics.jsonl").write_text('{"stage": "minillm"\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 1: not a JSON object"):
        advice_from_run(tmp_path)
    with pytest.raises(ValueError, match=r"config\.yaml: not found"):
        advice_from_run(tmp_path / "nowhere")


@pytest.mark.parametrize("staleness, worker_threads, learner_threads, warned", [
    (1, 2, 2, True),    # 4 threads overlapping on 2 cores
    (1, 1, 1, False),   # the cores split between the roles
    (0, 2, 2, False),   # on-policy: the roles take turns
])
def test_overlapped_roles_that_oversubscribe_the_cores_are_warned_about(monkeypatch, capsys, staleness,
                                                                       worker_threads, learner_threads, warned):
    from minillm_rl.config import RunConfig
    from minillm_rl.runtime.rollout import fleet

    monkeypatch.setattr(fleet.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(fleet.torch.cuda, "is_available", lambda: False)
    cfg = RunConfig()
    cfg.runtime.max_staleness, cfg.runtime.worker_threads = staleness, worker_threads
    cfg.runtime.learner_threads = learner_threads
    fleet.warn_if_overlapped_roles_contend(cfg)
    out = capsys.readouterr().out
    assert ("ask for 4 threads on 2 cores" in out) is warned, out


def test_learner_threads_are_set_before_the_learner_starts(monkeypatch):
    import torch

    from minillm_rl.config import RunConfig
    from minillm_rl.runtime import coordinator

    class Started(Exception):
        pass

    def stop(timeout_s):
        raise Started(torch.get_num_threads())

    monkeypatch.setattr(coordinator, "init_distributed", stop)
    cfg = RunConfig()
    cfg.runtime.learner_threads = 1
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so a learner that ignored the setting would show 2, on any machine
    try:
        with pytest.raises(Started) as started:
            coordinator.run_training(cfg)
    finally:
        torch.set_num_threads(before)
    assert started.value.args == (1,)
