"""Faults survived or reported (issue 6): a rollout worker or the replay store SIGKILLed mid-round,
a stuck worker, and a failed `minillm-rl train` that leaves no process behind.

The round-level tests drive :class:`~minillm_rl.runtime.rollout.client.RolloutClient` with real Ray actors
on tiny Llamas (no DeepSpeed): a disturbed round must equal an undisturbed one with the same seeds
(the same tokens; recorded log-probs within 1e-5), and the replay store's books must balance. Faults are injected at exact points by
``tests/fault_assets.py`` (a store that SIGKILLs a process at a chosen call), or right after the
launch of a round whose generation takes seconds (a student whose forward sleeps).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

from minillm_rl.runtime.rounds import canonical_order, check_one_policy_version, concat_rollouts
from minillm_rl.runtime.replay import make_replay_store_actor
from minillm_rl.runtime.rollout.client import RolloutClient, WorkerCalls
from minillm_rl.runtime.rollout.fleet import wait_until_started
from minillm_rl.algorithm.sampler import SamplingConfig
from minillm_rl.runtime.rollout.worker import call_with_timeout, make_rollout_worker

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from fault_assets import KillingStore, slow_llama, slow_to_load  # noqa: E402
from test_train_e2e import REPO, _train_command, assets  # noqa: E402,F401  (assets is a fixture)
from tiny_assets import tiny_llama, tiny_tokenizer  # noqa: E402

# One xdist group (make test: --dist loadgroup): its tests share one Ray instance,
# its slow workers and the fault-free reference round.
pytestmark = pytest.mark.xdist_group("test_faults")

ray = pytest.importorskip("ray")

VOCAB = len(tiny_tokenizer())
PROMPTS = [[3 + (7 * row + col) % (VOCAB - 3) for col in range(2 + row % 3)] for row in range(8)]
SHARDS = [PROMPTS[:4], PROMPTS[4:]]
SEEDS = [11, 12]
SAMPLING = SamplingConfig(alpha=0.2, max_new_tokens=8, teacher_dist="exact")
TIMEOUT_S = 120.0
# Per student forward: a shard (9 forwards) takes about a second, so a kill sent right after the
# launch lands mid-generation.
SLOW_S = 0.1


@pytest.fixture(scope="module")
def local_ray():
    """Ray whose actors can import tests/ (fault_assets, tiny_assets)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS),
                                                                                       os.environ.get("PYTHONPATH")]))}})
    yield ray
    if started:
        ray.shutdown()


def _worker(name: str, delay_s: float):
    teacher = functools.partial(tiny_llama, VOCAB, 2, 0, 0.3)
    student = functools.partial(slow_llama, VOCAB, delay_s)
    return make_rollout_worker(teacher, student, threads=1, seed=0, name=name)


@pytest.fixture(scope="module")
def workers(local_ray):
    handles = [_worker(f"rollout-worker-{i}", SLOW_S) for i in range(2)]
    yield handles
    for handle in handles:
        local_ray.kill(handle, no_restart=True)


@pytest.fixture(scope="module")
def learner_student():
    """The learner's weights (version 4) that every worker must generate with."""
    return tiny_llama(VOCAB, 1, 5, 0.3)


def _store(killing: bool = False):
    if killing:
        return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(KillingStore).remote(64, 10**9)
    return make_replay_store_actor(64, 10**9)


def _client(workers, store, student, rpc_timeout_s: float = TIMEOUT_S, names=None) -> RolloutClient:
    client = RolloutClient(workers, store, SAMPLING, lambda: (student, 4), rpc_timeout_s, TIMEOUT_S, names)
    client.sync()
    return client


def _round(client: RolloutClient):
    return canonical_order(client.take_round(0, len(PROMPTS), 4))


def _assert_same_rollout(items, reference) -> None:
    assert [item.key for item in items] == [item.key for item in reference]
    got, expected = concat_rollouts([i.payload for i in items], 0), concat_rollouts([i.payload for i in reference], 0)
    for field in dataclasses.fields(expected):
        mine, theirs = getattr(got, field.name), getattr(expected, field.name)
        if isinstance(theirs, torch.Tensor) and not theirs.is_floating_point():
            assert torch.equal(mine, theirs), field.name  # the same tokens, masks, shapes
        elif isinstance(theirs, torch.Tensor):
            # A restarted process may take another (equally exact) CPU kernel path, e.g. for a
            # differently aligned buffer, so the recorded log-probs may differ in the last bits.
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5, msg=field.name)
        else:
            assert mine == theirs, field.name


def _balanced(stats: dict) -> bool:
    return stats["produced"] == (stats["consumed"] + stats["dropped_stale"] + stats["lost_on_restore"]
                                 + stats["in_store_samples"])


def _pid(worker) -> int:
    return call_with_timeout(worker.process_info.remote(), TIMEOUT_S, "process_info")["pid"]


@pytest.fixture(scope="module")
def reference(workers, learner_student):
    """Round 0 generated without any fault."""
    store = _store()
    client = _client(workers, store, learner_student)
    client.launch(0, SHARDS, SEEDS)
    items = _round(client)
    stats = client.replay_stats()
    assert (stats["produced"], stats["consumed"], stats["relaunches"]) == (8, 8, 0)
    ray.kill(store)
    return items


def test_worker_killed_mid_generation_is_relaunched_with_the_same_seed(workers, learner_student, reference):
    store = _store()
    client = _client(workers, store, learner_student)
    old_pid = _pid(workers[1])
    client.launch(0, SHARDS, SEEDS)
    os.kill(old_pid, signal.SIGKILL)  # its shard needs about a second: it is mid-generation
    items = _round(client)
    _assert_same_rollout(items, reference)
    assert _pid(workers[1]) != old_pid
    stats = client.replay_stats()
    assert stats["relaunches"] == 1 and stats["store_recoveries"] == 0
    assert (stats["produced"], stats["consumed"], stats["duplicates_ignored"]) == (8, 8, 0)
    assert _balanced(stats)
    ray.kill(store)


def test_a_weight_sync_during_a_generation_never_reaches_it(workers, learner_student):
    """A sync published while both workers generate (each shard takes about a second) neither
    waits for the generation nor enters it: every token of the round is drawn with the version
    it started with, and the next round with the new version (per-token versions checked)."""
    store = _store()
    current = [(learner_student, 4)]
    client = RolloutClient(workers, store, SAMPLING, lambda: current[0], TIMEOUT_S, TIMEOUT_S)
    client.sync()
    client.launch(0, SHARDS, SEEDS)
    current[0] = (tiny_llama(VOCAB, 1, 6, 0.3), 5)  # the learners' update
    client.publish()
    in_flight = [shard.ref for shard in client._running.values()]
    ready, _ = ray.wait(in_flight, num_returns=len(in_flight), timeout=0)
    assert len(in_flight) == 2 and not ready  # publish() returned with both generations still running
    for round_index, version in ((0, 4), (1, 5)):
        if round_index:
            client.launch(1, SHARDS, SEEDS)
        items = canonical_order(client.take_round(round_index, len(PROMPTS), version))
        for item in items:
            rollout = item.payload
            valid = rollout.response_mask.bool()
            assert item.policy_version == rollout.policy_version == version
            assert valid.any() and bool((rollout.token_policy_versions[valid] == version).all())
            check_one_policy_version(item)
    item.payload.token_policy_versions[0, 0] = 4  # what a sync landing inside the generation would record
    with pytest.raises(RuntimeError, match=r"drawn with student weight versions \[4, 5\], stored as version 5"):
        check_one_policy_version(item)
    ray.kill(store)


def test_worker_killed_after_its_put_is_not_counted_twice(workers, learner_student, reference):
    store = _store(killing=True)
    client = _client(workers, store, learner_student)
    call_with_timeout(store.arm.remote("put", (0, 1), _pid(workers[1])), TIMEOUT_S, "arm")
    client.launch(0, SHARDS, SEEDS)
    items = _round(client)
    _assert_same_rollout(items, reference)
    stats = client.replay_stats()
    # Stored once, generated twice: the relaunched shard's put was recognised by its key.
    assert stats["relaunches"] == 1 and stats["duplicates_ignored"] == 1
    assert (stats["produced"], stats["consumed"], stats["in_store_samples"]) == (8, 8, 0)
    assert _balanced(stats)
    ray.kill(store)


def test_teacher_calls_on_a_killed_worker_are_made_again(workers):
    """KD/PT teacher scoring and SeqKD teacher sampling (``WorkerCalls``): calls queued on a
    worker that is killed are made again on the restarted actor, with the undisturbed results."""
    input_ids = torch.tensor([row[:2] for row in PROMPTS])
    scoring = [(input_ids, torch.ones_like(input_ids), top_k) for top_k in (0, 3, 0, 3)]
    teacher_sampling = dataclasses.replace(SAMPLING, alpha=1.0, teacher_dist="none")
    sampling_args = [(SHARDS[0], teacher_sampling, 5), (SHARDS[1], teacher_sampling, 6)]
    reference_scores = WorkerCalls(workers, "score_teacher", scoring, TIMEOUT_S, "test").results()
    reference_samples = WorkerCalls(workers, "generate_from_teacher", sampling_args, TIMEOUT_S, "test").results()

    pid = _pid(workers[1])
    version = call_with_timeout(workers[1].policy_version.remote(), TIMEOUT_S, "policy_version")
    workers[1].generate.remote(PROMPTS, SAMPLING, 0, version)  # about a second: the calls below queue behind it
    scores = WorkerCalls(workers, "score_teacher", scoring, TIMEOUT_S, "test")
    samples = WorkerCalls(workers, "generate_from_teacher", sampling_args, TIMEOUT_S, "test")
    os.kill(pid, signal.SIGKILL)
    got_scores, got_samples = scores.results(), samples.results()
    assert _pid(workers[1]) != pid and scores.relaunches + samples.relaunches >= 1
    for got, expected in zip(got_scores, reference_scores):
        for field in ("logprobs", "topk_logprobs"):
            if getattr(expected, field) is not None:
                torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=1e-5, atol=1e-5)
    for got, expected in zip(got_samples, reference_samples):
        assert torch.equal(got.response_ids, expected.response_ids)


@pytest.mark.parametrize("when", ["take", "put"])
def test_replay_store_killed_mid_round_regenerates_what_it_lost(workers, learner_student, reference, when):
    """Killed at the take (after both shards were stored) or right after storing shard 0 (the
    other shard's put may land before, after or during the restart)."""
    store = _store(killing=True)
    client = _client(workers, store, learner_student)
    call_with_timeout(store.arm.remote(*(("take",) if when == "take" else ("put", (0, 0)))), TIMEOUT_S, "arm")
    client.launch(0, SHARDS, SEEDS)
    items = _round(client)
    _assert_same_rollout(items, reference)
    stats = client.replay_stats()
    assert stats["store_recoveries"] >= 1 and _balanced(stats)
    # Every sample consumed once; each copy the dead store took with it is produced and lost.
    assert stats["consumed"] == 8 and stats["in_store_samples"] == 0
    assert stats["produced"] == 8 + stats["lost_on_restore"]
    if when == "take":
        assert stats["lost_on_restore"] == 8 and stats["relaunches"] == 2
    else:
        # Shard 0's put was never acknowledged, so its copy in the dead store was never counted;
        # shard 1 is lost (4) when it was acknowledged before the kill, not (0) when it landed in
        # the restarted store; 8 when a recovery pass also lost the relaunched shard 0.
        assert stats["lost_on_restore"] in (0, 4, 8)
    # The next round goes through the restarted store with the restored books.
    client.launch(1, SHARDS, SEEDS)
    client.take_round(1, len(PROMPTS), 4)
    after = client.replay_stats()
    assert after["consumed"] == 16 and after["produced"] == stats["produced"] + 8 and _balanced(after)
    ray.kill(store)


def test_stuck_worker_times_out_naming_the_worker_and_the_call(local_ray, learner_student):
    stuck = _worker("rollout-worker-stuck", delay_s=3600.0)
    store = _store()
    process = psutil.Process(_pid(stuck))  # both actors are up before the 2 s limit applies
    call_with_timeout(store.stats.remote(), TIMEOUT_S, "stats")
    client = _client([stuck], store, learner_student, rpc_timeout_s=2.0, names=["rollout-worker-stuck"])
    client.launch(0, [PROMPTS], [1])
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^rollout-worker-stuck\.generate_into\(round 0, shard 0\) did not "
                                           r"finish within 2 s$"):
        client.take_round(0, len(PROMPTS), 4)
    assert time.monotonic() - started < 60  # the timeout, not the hour-long forward
    ray.kill(stuck, no_restart=True)
    ray.kill(store)
    _, alive = psutil.wait_procs([process], timeout=30)
    assert not alive, f"the stuck worker's process {process.pid} survived ray.kill"


def test_a_worker_slow_to_start_fails_the_start_wait_naming_it(local_ray):
    teacher = functools.partial(tiny_llama, VOCAB, 2, 0, 0.3)
    student = functools.partial(slow_to_load, 3600.0, functools.partial(tiny_llama, VOCAB, 1, 1, 0.3))
    slow = make_rollout_worker(teacher, student, threads=1, seed=0, name="rollout-worker-slow")
    store = _store()
    call_with_timeout(store.stats.remote(), TIMEOUT_S, "stats")  # the store has started: only the worker is late
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^rollout-worker-slow did not start within 3 s "
                                           r"\(runtime\.actor_start_timeout_s\)$"):
        wait_until_started({"rollout-worker-slow": slow.policy_version.remote(), "the replay store": store.stats.remote()},
                           3.0)
    assert time.monotonic() - started < 30
    ray.kill(slow, no_restart=True)
    ray.kill(store)


def test_stuck_worker_fails_the_run_with_one_line_and_leaves_no_process(assets, tmp_path):
    """A `minillm-rl train` whose rollout workers hang in generate (injected by
    tests/hang_injection/sitecustomize.py): exit 1, the cause as one line, and no process that
    inherited the run's environment (Ray's gcs, raylet, actors...) outlives it. The actors did
    inherit it: the hang, injected the same way, is what timed out.

    The workers also take longer to start than rpc_timeout_s: their start has its own limit
    (runtime.actor_start_timeout_s), so the run still gets as far as the hung generate."""
    out = tmp_path / "run"
    # A Ray of the run's own (the actors get the injected hang through its environment).
    args, env = _train_command(assets, out, "runtime.num_learners=1", "train.phases=[minillm]",
                               "runtime.ray_address=local", "runtime.rpc_timeout_s=8",
                               "runtime.actor_start_timeout_s=240")
    marker = uuid.uuid4().hex
    env = {**env, "MINILLM_TEST_HANG_GENERATE_S": "3600", "MINILLM_TEST_SLOW_START_S": "10",
           "MINILLM_TEST_RUN": marker,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS / "hang_injection"), env.get("PYTHONPATH")]))}
    result = subprocess.run(args, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # One message, the run's cause. (It may share a terminal line with the progress bar it interrupted.)
    messages = re.findall(r"minillm-rl: [^\r\n]*", result.stderr)
    assert len(messages) == 1 and re.fullmatch(
        r"minillm-rl: run failed: rank 0: rollout-worker-[01]\.generate_into\(round 0, shard [01]\) did not finish "
        r"within 8 s \(minillm_rl/\S+:\d+ in \w+\); last good checkpoint: none; tracebacks: \S+rank0\.traceback",
        messages[0]), result.stderr[-3000:]

    def of_this_run(process: psutil.Process) -> bool:
        try:
            return process.environ().get("MINILLM_TEST_RUN") == marker
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    left = [process for process in psutil.process_iter() if of_this_run(process)]
    _, alive = psutil.wait_procs(left, timeout=10)  # let already-signalled processes finish exiting
    assert not alive, [" ".join(process.cmdline()) for process in alive]


# --------------------------------------------------------------------------------------------
# Bad input: refused before anything is written (issue 6 item 4)
# --------------------------------------------------------------------------------------------

_GOOD_RECORD = '{"instruction": "say hello", "context": "", "response": "hello world"}\n'


def _bad_data(line: bytes) -> Callable[[dict, Path], list[str]]:
    def make(assets: dict, tmp: Path) -> list[str]:
        path = tmp / "bad.jsonl"
        path.write_bytes(_GOOD_RECORD.encode() * 3 + line + b"\n")
        return [f"data.train={path}"]
    return make


def _contradicting_deepspeed_file(assets: dict, tmp: Path) -> list[str]:
    path = tmp / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}}))
    return [f"runtime.deepspeed_config={path}"]


def _without_weights(role: str) -> Callable[[dict, Path], list[str]]:
    def make(assets: dict, tmp: Path) -> list[str]:
        copy = tmp / role
        copy.mkdir()
        for item in assets[role].iterdir():
            if not item.name.endswith(".safetensors"):
                (copy / item.name).write_bytes(item.read_bytes())
        return [f"model.{role}={copy}"]
    return make


BAD_INPUTS = {
    "malformed JSON line": (_bad_data(b'{"instruction": "a", "response": '), r"bad\.jsonl:4: malformed JSON"),
    "missing field": (_bad_data(b'{"instruction": "a"}'), r"bad\.jsonl:4: missing field 'response'"),
    "mistyped field": (_bad_data(b'{"instruction": "a", "response": 5}'), r"bad\.jsonl:4: field 'response' is int"),
    "empty response": (_bad_data(b'{"instruction": "a", "response": " "}'), r"bad\.jsonl:4: empty response"),
    "non-UTF-8 bytes": (_bad_data(b'{"instruction": "\xff", "response": "b"}'), r"bad\.jsonl:4: invalid UTF-8"),
    "no prompt within budget": (lambda a, t: ["data.max_prompt_tokens=2", "data.max_length=10"],
                                r"data\.train: .* has no example whose prompt fits data\.max_prompt_tokens=2"),
    "missing model path": (lambda a, t: [f"model.student={t / 'nowhere'}"], r"model path .*nowhere.*no such directory"),
    "student dir without weights": (_without_weights("student"), r"model\.student: model path .*student.* "
                                                                  r"config\.json and \*\.safetensors or \*\.bin weights"),
    "teacher dir without weights": (_without_weights("teacher"), r"model\.teacher: model path .*teacher.* config\.json "
                                                                  r"and \*\.safetensors or \*\.bin weights"),
    "alpha outside [0, 1]": (lambda a, t: ["sampling.alpha=1.5"], r"sampling\.alpha"),
    "negative lr": (lambda a, t: ["train.optim.lr=-0.1"], r"train\.optim\.lr"),
    "unknown key": (lambda a, t: ["train.totl_steps=3"], r"train\.totl_steps.*did you mean 'train\.total_steps'"),
    "output directory that cannot be created": (lambda a, t: ["output.dir=/proc/nonexistent/x"],
                                                r"^minillm-rl: error: output\.dir: cannot create /proc/nonexistent/x "),
    "resume target that does not exist": (lambda a, t: ["--resume", str(t / "no-such-checkpoint")],
                                          r"^minillm-rl: error: --resume .*no-such-checkpoint: expected 'auto', 'none'"),
    "resume target in the recipe that does not exist": (
        lambda a, t: [f"output.resume={t / 'no-such-checkpoint'}"],
        r"output\.resume: expected 'none', 'auto' or an existing checkpoint path"),
    "current reward in neither term (biased gradient)": (
        lambda a, t: ["advantage.include_current_reward=false", "loss.single_step=false"],
        r"advantage\.include_current_reward: is false and loss\.single_step is false: .* biased"),
    "DeepSpeed file contradicting the recipe": (_contradicting_deepspeed_file,
                                                r"\.yaml:\d+: sft\.batch_size: is 8 but .*ds\.json sets "
                                                r"train_micro_batch_size_per_gpu=3"),
}


class PastTheChecks(Exception):
    """Raised where a run would start: the input checks let it through."""


def _stop_past_the_input_checks(monkeypatch, case: str) -> None:
    """The re-launch under deepspeed, the learner process group, Ray and the run raise
    :class:`PastTheChecks` instead of starting."""
    from minillm_rl.cli import launch
    from minillm_rl.runtime import coordinator, run
    from minillm_rl.runtime.rollout import fleet

    def past_the_checks(*args, **kwargs):
        raise PastTheChecks(f"{case}: the run got past the input checks")

    monkeypatch.setattr(coordinator, "init_distributed", lambda timeout_s: (0, 1))
    monkeypatch.setattr(fleet.RolloutFleet, "__init__", past_the_checks)
    monkeypatch.setattr(run.TrainingRun, "__init__", past_the_checks)
    monkeypatch.setattr(coordinator, "run_phases", past_the_checks)
    monkeypatch.setattr(launch, "relaunch_under_deepspeed", past_the_checks)


def test_data_with_a_byte_order_mark_is_accepted(assets, tmp_path, monkeypatch):
    """The same checks accept a jsonl that starts with a UTF-8 BOM (Windows tools write one)."""
    from minillm_rl import cli

    _stop_past_the_input_checks(monkeypatch, "BOM")
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + _GOOD_RECORD.encode() * 4)
    argv, _ = _train_command(assets, tmp_path / "run", "runtime.num_learners=2", f"data.train={data}",
                             "data.num_validation=2")
    with pytest.raises(PastTheChecks):
        cli.main(argv[argv.index("train"):])


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_the_output_dir_is_never_created(case, assets, tmp_path, capsys,
                                                                          monkeypatch):
    """`minillm-rl train` with 2 learners, in process (the teacher/student tokenizer mismatch is
    test_train_e2e.py's, as a subprocess). The re-launch under deepspeed, the learner process
    group, Ray and the run itself are stubbed out: every check must fire in the CLI process,
    before any rank would start."""
    from minillm_rl import cli

    _stop_past_the_input_checks(monkeypatch, case)
    make_overrides, expected = BAD_INPUTS[case]
    out = tmp_path / "run"
    argv, _ = _train_command(assets, out, "runtime.num_learners=2", *make_overrides(assets, tmp_path))
    code = cli.main(argv[argv.index("train"):])
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("minillm-rl: error: "), stderr
    assert re.search(expected, lines[0]), lines[0]
    assert not out.exists()
