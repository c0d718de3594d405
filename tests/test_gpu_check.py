"""``make gpu-check`` (bench/gpu_check.py) without a GPU: its verdicts and report, that it refuses
to run in one line, and the fractional GPU placement of rollout workers it relies on
(``runtime.worker_gpus`` < 1: config, plan, Ray)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm_rl.cli.plan import place_roles, placeholder_cluster
from minillm_rl.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402
from gpu_check import (  # noqa: E402
    Check,
    decode_check,
    exit_status,
    memory_check,
    render_report,
    resume_check,
    timed_check,
)

RECIPE = REPO / "launch" / "recipes" / "tiny-e2e.yaml"


def test_decode_verdict_is_the_ratio_to_the_two_model_bound():
    tokens_per_s = {"hf_teacher": 300.0, "hf_student": 600.0, "mixed_exact": 190.0, "mixed_topk": 195.0,
                    "alpha0_exact": 250.0}
    check = decode_check(tokens_per_s, batch=16)  # bound = 1 / (1/300 + 1/600) = 200
    assert check.numbers["bound"] == 200.0 and check.numbers["mixed_exact/bound"] == 0.95 and check.passed
    assert not decode_check({**tokens_per_s, "mixed_exact": 170.0}, batch=16).passed  # 0.85 < 0.9
    assert check.name == "decode_b16" and check.numbers["batch"] == 16


def test_memory_verdict_accepts_only_the_stated_range():
    gib = 2**30
    low, high = gpu_check.MEMORY_RATIO_RANGE
    assert memory_check("m", int(high * gib), gib).passed and memory_check("m", int(low * gib) + 1, gib).passed
    assert not memory_check("m", int((high + 0.01) * gib), gib).passed
    assert not memory_check("m", int((low - 0.01) * gib), gib).passed
    check = memory_check("learner_zero2", 3 * gib // 2, gib, peak_GiB=2.0)
    assert check.numbers == {"measured_GiB": 1.5, "plan_GiB": 1.0, "measured/plan": 1.5, "peak_GiB": 2.0}


def test_resume_verdict_wants_identical_bits():
    reference = {"a": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "b": torch.ones(3, dtype=torch.bfloat16)}
    assert resume_check(reference, {k: v.clone() for k, v in reference.items()}).passed
    nudged = {**reference, "b": torch.tensor([1.0, 1.0, 1.0078125], dtype=torch.bfloat16)}  # one bf16 ulp
    check = resume_check(reference, nudged)
    assert not check.passed and check.numbers == {"tensors": 2, "differing": 1, "max_abs_diff": 0.0078125}
    assert not resume_check(reference, {"a": reference["a"]}).passed  # a missing tensor


def test_sampler_verdict_uses_the_bf16_tolerance_of_the_largest_logit(monkeypatch):
    torch.manual_seed(0)
    from conftest import make_tiny_lm

    teacher, student = (make_tiny_lm("llama", 16, num_layers=2, seed=seed, init_std=0.3).to(torch.bfloat16)
                        for seed in (1, 2))

    class Tokenizer:  # what sampler_check reads of a tokenizer
        eos_token_id, pad_token_id = 1, 0

    prompts = (torch.randint(2, 16, (4, 6)), torch.ones(4, 6, dtype=torch.long))
    monkeypatch.setattr(gpu_check, "_prompts", lambda tokenizer, count, device: prompts)
    check = gpu_check.sampler_check(teacher, student, Tokenizer(), torch.bfloat16)
    assert check.name == "sampler_bf16" and check.passed, check.numbers
    ulp = check.numbers["tol_student"] / gpu_check.SAMPLER_BF16_ULPS  # of the largest logit Z: 2^(floor(log2 Z) - 7)
    assert math.log2(ulp).is_integer() and ulp * 2**7 <= check.numbers["largest_logit"] + 0.01 < ulp * 2**8
    assert all(check.numbers[f"max_err_{key}"] <= check.numbers[f"tol_{key}"] for key in ("student", "teacher"))

    # Records one nat off (e.g. from another position) fail it.
    import minillm_rl.algorithm.sampler as sampler

    def shifted(*args, **kwargs):
        rollout = sample_rollouts(*args, **kwargs)
        rollout.student_logprobs += rollout.response_mask
        return rollout

    sample_rollouts = sampler.sample_rollouts
    monkeypatch.setattr(sampler, "sample_rollouts", shifted)
    broken = gpu_check.sampler_check(teacher, student, Tokenizer(), torch.bfloat16)
    assert not broken.passed and broken.numbers["max_err_student"] >= 1 - broken.numbers["tol_student"]


def test_report_lists_every_check_and_the_verdict():
    checks = [Check("cuda", True, {"device": "NVIDIA H200", "bf16": True}, "bf16 supported", 3.2),
              Check("learner_zero3", False, {"measured/plan": 1.9}, "in [0.75, 1.5]", 41.0),
              Check("resume", None, {"needs": "train_zero2"}, "bit-identical")]
    report = render_report(checks, seconds=300.4)
    lines = report.splitlines()
    assert lines[0] == "## make gpu-check"
    assert lines[2] == "| check | result | numbers | criterion | s |"
    assert lines[4] == "| cuda | **PASS** | device NVIDIA H200, bf16 True | bf16 supported | 3 |"
    assert lines[5] == "| learner_zero3 | **FAIL** | measured/plan 1.9 | in [0.75, 1.5] | 41 |"
    assert lines[6] == "| resume | **SKIP** | needs train_zero2 | bit-identical | 0 |"
    assert lines[-1] == "1 passed, 1 failed, 1 not run in 300 s: **NOT READY**"
    assert exit_status(checks) == 1 and exit_status(checks[:1]) == 0
    last = render_report(checks[:1], 5).splitlines()[-1]
    assert last == "1 passed, 0 failed, 0 not run in 5 s: **all checks passed**"


def test_a_crashing_check_is_a_fail_row_with_its_message():
    def broken():
        raise RuntimeError("exit 1 (expected 0): CUDA out of memory\nmore")

    check = timed_check("train_zero3", "exit 0", broken)
    assert check.status == "FAIL"
    assert check.numbers == {"error": "RuntimeError: exit 1 (expected 0): CUDA out of memory"}


def test_without_a_gpu_it_prints_one_line_and_runs_nothing(tmp_path):
    out = tmp_path / "report.md"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out)],
                            env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing was run"]
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Fractional GPUs for rollout workers
# --------------------------------------------------------------------------------------------

def test_worker_gpus_takes_a_fraction_or_whole_gpus():
    assert load_config(str(RECIPE), ["runtime.worker_gpus=0.5"]).runtime.worker_gpus == 0.5
    assert load_config(str(RECIPE), ["runtime.worker_gpus=2"]).runtime.worker_gpus == 2.0
    with pytest.raises(ConfigError, match=r"runtime.worker_gpus: must be a fraction of one GPU \(0 < x < 1\) or a "
                                          r"whole number of GPUs, got 1.5"):
        load_config(str(RECIPE), ["runtime.worker_gpus=1.5"])


def test_plan_packs_fractional_workers_on_the_gpus_left_by_the_learners():
    cluster = placeholder_cluster(2, 4)
    learners, workers = place_roles(cluster, 6, 4, 0.34)  # floor(1 / 0.34) = 2 workers per GPU
    assert learners == [("node0", g) for g in range(4)] + [("node1", 0), ("node1", 1)]
    assert workers == [[("node1", 2)], [("node1", 2)], [("node1", 3)], [("node1", 3)]]
    with pytest.raises(ValueError, match=r"num_rollout_workers=5 x runtime.worker_gpus=0.34 GPUs do not fit"):
        place_roles(cluster, 6, 5, 0.34)
    assert place_roles(cluster, 6, 4, 0.25)[1] == [[("node1", 2)]] * 4  # 4 on the first free GPU
    assert place_roles(cluster, 4, 2, 2.0)[1] == [[("node1", 0), ("node1", 1)], [("node1", 2), ("node1", 3)]]


@pytest.fixture
def one_fake_gpu_ray():
    """A local Ray that declares one GPU (on a CPU machine Ray only accounts for it; actors on it
    get CUDA_VISIBLE_DEVICES set and run on CPU here)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_two_half_gpu_rollout_workers_share_one_gpu(one_fake_gpu_ray, tmp_path):
    """What ``runtime.worker_gpus=0.5`` asks Ray for: two rollout worker actors on one GPU, both
    running, and nothing of the GPU left for a third."""
    from tiny_assets import write_assets

    from minillm_rl.runtime.rollout.worker import UNSYNCED_VERSION, call_with_timeout, make_rollout_worker

    ray = one_fake_gpu_ray
    assets = write_assets(tmp_path / "assets", num_examples=4)
    workers = [make_rollout_worker(str(assets["teacher"]), str(assets["student"]), threads=1, num_gpus=0.5,
                                   name=f"rollout-worker-{i}") for i in range(2)]
    versions = call_with_timeout([w.policy_version.remote() for w in workers], 180, "rollout workers")
    assert versions == [UNSYNCED_VERSION] * 2
    assert ray.available_resources().get("GPU", 0.0) == 0.0 and ray.cluster_resources()["GPU"] == 1.0
    for worker in workers:
        ray.kill(worker, no_restart=True)
