"""Recipes, DeepSpeed files and the `make train-opt13b DRY_RUN=1` plan: every recipe validates, the
shipped DeepSpeed files agree with every recipe and a contradicting one is refused in one line,
parameter counts equal the published ones, roles sit on disjoint GPUs, and the learner memory
estimates agree with DeepSpeed's own estimators."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import chain
from pathlib import Path

import pytest

from minillm_rl import cli
from minillm_rl.config import ConfigError, load_config
from minillm_rl.cli.plan import (
    build_plan,
    find_model_config,
    model_stats,
    placeholder_cluster,
    read_hostfile,
    resolved_ds_configs,
    zero_model_state_bytes,
)

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "launch" / "recipes").glob("*.yaml"))
DS_FILES = sorted((REPO / "ds_configs").glob("*.json"))
TEACHER_SFT, STUDENT = "launch/recipes/opt-13b-teacher-sft.yaml", "launch/recipes/opt-13b-to-1.3b.yaml"
# num_parameters() of the published Hugging Face checkpoints, and their embedding (V x d), the
# module with the most parameters of its own.
PUBLISHED = {
    "opt-13b": (12_853_473_280, 50272 * 5120), "opt-1.3b": (1_315_758_080, 50272 * 2048),
    "gpt2-xl": (1_557_611_200, 50257 * 1600), "gpt2": (124_439_808, 50257 * 768),
    "llama-13b": (13_015_864_320, 32000 * 5120), "llama-7b": (6_738_415_616, 32000 * 4096),
}


@pytest.fixture
def in_repo(monkeypatch):
    """Recipes name ds_configs/ relative to the repository root, where the commands run."""
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def opt_plan() -> dict:
    """What `make train-opt13b DRY_RUN=1` prints, as JSON (the Makefile's own command line; `-o
    install`: the packages are installed already, `make test` ran that prerequisite)."""
    # --no-print-directory: under `make ci` this make is nested and would print "Entering directory".
    result = subprocess.run(["make", "-s", "--no-print-directory", "-o", "install", "train-opt13b", "DRY_RUN=1",
                             "PLAN_ARGS=--json", f"PYTHON={sys.executable}"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("{"):])


def _ds_estimators():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero3_model_states_mem_needs, estimate_zero2_model_states_mem_needs


# ---- recipes and DeepSpeed files -----------------------------------------------------------

def test_every_recipe_loads_and_its_batches_split_over_its_learners(in_repo):
    assert {path.name for path in RECIPES} >= {"opt-13b-to-1.3b.yaml", "opt-13b-teacher-sft.yaml", "tiny-e2e.yaml",
                                               "gpt2-xl-to-base.yaml", "llama-13b-to-7b.yaml", "smollm2-cpu-demo.yaml"}
    for path in RECIPES:
        cfg = load_config(str(path.relative_to(REPO)))
        assert path.read_text().startswith("#"), f"{path.name} must start with the comment showing how to run it"
        resolved = resolved_ds_configs(cfg, cfg.runtime.num_learners)  # the learner's own resolution
        for phase, ds_config in resolved.items():
            rows = cfg.train.micro_batch_size if phase == "minillm" else cfg.sft.batch_size
            assert ds_config["train_batch_size"] == rows, (path.name, phase)


def test_opt_recipe_has_the_papers_settings(in_repo):
    cfg = load_config(STUDENT)
    optim = cfg.train.optim
    assert (optim.lr, optim.betas, optim.weight_decay, optim.warmup_steps, optim.lr_schedule, optim.grad_clip) == (
        5e-6, (0.9, 0.95), 1e-6, 100, "constant", 1.0)
    assert (cfg.train.total_steps, cfg.train.max_prompt_epochs, cfg.train.num_rollouts, cfg.train.ppo_epochs,
            cfg.train.micro_batch_size, cfg.train.eval_interval) == (5000, 10, 256, 4, 16, 100)
    assert (cfg.sampling.alpha, cfg.advantage.gamma, cfg.loss.clip_eps, cfg.advantage.reward_scaling,
            cfg.advantage.reward_clip) == (0.2, 0.95, 0.2, 0.5, 100.0)
    assert (cfg.data.max_length, cfg.data.max_prompt_tokens, cfg.model.gradient_checkpointing) == (512, 256, True)
    assert (cfg.sft.optim.lr, cfg.sft.optim.lr_schedule, cfg.sft.num_epochs, cfg.sft.batch_size) == (
        5e-5, "cosine", 10, 32)
    assert cfg.data.train == "databricks/databricks-dolly-15k" and cfg.train.phases == ["sft", "minillm"]
    assert cfg.model.teacher == load_config(TEACHER_SFT).output.dir + "/best"


def test_shipped_ds_configs_cover_zero_stages_and_precisions():
    kinds = set()
    for path in DS_FILES:
        ds = json.loads(path.read_text())
        zero = ds["zero_optimization"]
        precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
        kinds.add((zero["stage"], precision, "offload_optimizer" in zero))
    assert {(stage, precision, False) for stage in (1, 2, 3) for precision in ("bf16", "fp16", "fp32")} <= kinds
    assert (3, "bf16", True) in kinds


def test_every_shipped_ds_config_agrees_with_every_recipe(in_repo):
    for recipe in RECIPES:
        for ds_file in DS_FILES:
            override = f"runtime.deepspeed_config={ds_file.relative_to(REPO)}"
            cfg = load_config(str(recipe.relative_to(REPO)), [override])
            resolved_ds_configs(cfg, cfg.runtime.num_learners)


@pytest.mark.parametrize("ds_change, message", [
    ({"train_batch_size": 64}, r"sft\.batch_size: is 32 but \S*bad\.json sets train_batch_size=64"),
    ({"train_micro_batch_size_per_gpu": 3}, r"sft\.batch_size: is 32 but \S*bad\.json sets "
                                            r"train_micro_batch_size_per_gpu=3, which does not divide it"),
    ({"train_micro_batch_size_per_gpu": 2}, r"bad\.json sets train_micro_batch_size_per_gpu=2, which needs a "
                                            r"different world size per phase"),
    ({"gradient_accumulation_steps": 4}, r"bad\.json sets gradient_accumulation_steps=4"),
    ({"optimizer": {"type": "Adam"}}, r"bad\.json has an 'optimizer' section"),
    ({"gradient_clipping": 0.5}, r"train\.optim\.grad_clip: is 1\.0 but \S*bad\.json sets gradient_clipping=0\.5"),
])
def test_contradicting_ds_file_is_refused_in_one_line(in_repo, tmp_path, capsys, ds_change, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads((REPO / "ds_configs" / "zero2_bf16.json").read_text()), **ds_change}))
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(STUDENT, [f"runtime.deepspeed_config={bad}"])
    assert "\n" not in str(caught.value)
    assert cli.main(["plan", "--config", STUDENT, f"runtime.deepspeed_config={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minillm-rl: error: ") and len(err.splitlines()) == 1 and "bad.json" in err


def test_per_rank_batch_that_contradicts_the_learner_count_is_refused_by_the_plan(in_repo, tmp_path):
    # 4 rows per rank agrees with both phases' batches (16 and 32 rows -> 4 and 8 ranks would
    # differ, so use an SFT batch of 16), but the recipe runs 8 learners: 16 / 8 = 2 rows per rank.
    bad = tmp_path / "per_rank.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    overrides = [f"runtime.deepspeed_config={bad}", "sft.batch_size=16"]
    load_config(STUDENT, overrides)  # nothing wrong without the world size
    with pytest.raises(ValueError, match=r"per_rank\.json: train_micro_batch_size_per_gpu=4 contradicts the recipe"):
        build_plan([STUDENT], overrides, placeholder_cluster(2, 8))


# ---- model sizes and memory formulas -------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_equal_the_published_ones(name):
    stats = model_stats(name, find_model_config(f"org/{name}"))
    assert (stats.num_params, stats.largest_layer_params) == PUBLISHED[name]


def test_model_config_lookup_for_hub_names_and_later_stage_outputs(tmp_path):
    assert find_model_config("facebook/OPT-13B").name == "opt-13b.json"
    assert find_model_config("runs/teacher-sft/llama-13b/best").name == "llama-13b.json"
    (tmp_path / "config.json").write_text("{}")
    assert find_model_config(str(tmp_path)) == tmp_path / "config.json"
    with pytest.raises(ValueError, match=r"model 'org/unknown-model': .*no part of the name has a config"):
        find_model_config("org/unknown-model")


def test_zero_formulas_by_hand():
    # P = 1000 parameters, largest layer L = 100, N = 4 ranks, sub-groups of 100 elements.
    state = lambda stage, **kw: zero_model_state_bytes(stage, 1000, 100, 4, **kw)  # noqa: E731
    assert state(1)["gpu"] == 2 * 1000 + 2 * 1000 + 16 * 250
    assert state(2)["gpu"] == 2 * 1000 + 18 * 250
    assert state(3)["gpu"] == 16 * 250 + 4 * 250 + 4 * 100
    assert state(3, sub_group_size=100)["gpu"] == 16 * 250 + 4 * 100 + 4 * 100
    assert state(3, mixed_precision=False)["gpu"] == 16 * 250 + 8 * 100
    assert state(2, mixed_precision=False)["gpu"] == 4 * 1000 + 12 * 250
    both = state(3, offload_optimizer=True, offload_params=True)
    assert both == {"gpu": 4 * 100, "cpu": (2 + 2 + 12 + 4) * 250}
    assert state(3, offload_optimizer=True)["gpu"] == 2 * 250 + 4 * 100


# ---- the train-opt13b plan -----------------------------------------------------------------

def _slots(groups) -> list[tuple]:
    return [tuple(slot) for slot in groups]


def test_train_opt13b_stages_roles_and_disjoint_gpus(opt_plan):
    cluster = {(host, gpu) for host, slots in opt_plan["cluster"]["hosts"] for gpu in range(slots)}
    assert len(cluster) == 16
    teacher, student, evaluation = opt_plan["stages"]
    assert (teacher["recipe"], teacher["phases"], student["recipe"], student["phases"]) == (
        TEACHER_SFT, ["sft"], STUDENT, ["sft", "minillm"])
    assert teacher["models"]["student"]["num_params"] == PUBLISHED["opt-13b"][0]
    # The student recipe's teacher is stage 1's output, sized as OPT-13B.
    assert student["models"]["teacher"]["num_params"] == PUBLISHED["opt-13b"][0]
    assert student["models"]["student"]["num_params"] == PUBLISHED["opt-1.3b"][0]

    learners = teacher["roles"]["learners"]
    assert (learners["world_size"], learners["nodes"], teacher["roles"]["rollout_workers"]["count"]) == (16, 2, 0)
    assert set(_slots(learners["gpus"])) == cluster
    learners, workers = student["roles"]["learners"], student["roles"]["rollout_workers"]
    worker_slots = _slots(chain.from_iterable(workers["gpus"]))
    assert (learners["world_size"], workers["count"], workers["gpus_each"]) == (8, 8, 1)
    assert len(set(_slots(learners["gpus"]))) == 8 and len(set(worker_slots)) == 8
    assert not set(_slots(learners["gpus"])) & set(worker_slots)
    assert set(_slots(learners["gpus"])) | set(worker_slots) <= cluster

    # The commands put each role on exactly those GPUs.
    commands = student["commands"]
    launch = next(c for c in commands if c["argv"][0] == "deepspeed")
    include = launch["argv"][launch["argv"].index("--include") + 1]
    assert {(host, int(gpu)) for part in include.split("@") for host, gpus in [part.split(":")]
            for gpu in gpus.split(",")} == set(_slots(learners["gpus"]))
    ray_gpus = {(c["host"], int(gpu)) for c in commands if c["argv"][1] in ("start-head", "start-worker")
                for gpu in c["env"]["CUDA_VISIBLE_DEVICES"].split(",") if gpu}
    assert ray_gpus == set(worker_slots)
    address = next(a for a in launch["argv"] if a.startswith("runtime.ray_address="))
    assert address == f"runtime.ray_address={launch['host']}:6379"
    assert [c["argv"][1] for c in commands if c["cleanup"]] == ["stop", "stop"]

    assert evaluation["kind"] == "eval" and evaluation["model"] == "runs/opt-1.3b-minillm/best"
    argv = evaluation["commands"][0]["argv"]
    assert argv[:2] == ["minillm-rl", "eval"] and argv[argv.index("--split") + 1] == "train[:500]"
    from minillm_rl.cli import build_parser
    parsed = build_parser().parse_args(argv[1:])  # the flags the plan writes are the CLI's own
    assert (parsed.dtype, parsed.device, parsed.seeds) == ("bfloat16", "cuda", [10, 20, 30, 40, 50])
    assert load_config(str(REPO / STUDENT)).data.split == "train[500:]"  # the test records are not trained on


def test_rollout_worker_memory_formula(opt_plan):
    worker = opt_plan["stages"][1]["memory"]["rollout_worker"]
    assert (worker["rollout_batch"], worker["seq_len"], worker["dtype"]) == (32, 512, "bfloat16")
    parts = worker["bytes"]
    assert parts["teacher_weights"] == PUBLISHED["opt-13b"][0] * 2
    assert parts["teacher_kv_cache"] == 2 * 40 * 5120 * 32 * 512 * 2
    assert parts["student_kv_cache"] == 2 * 24 * 2048 * 32 * 512 * 2
    # teacher_dist auto = hidden for OPT: the final hidden states (5120 wide, fp32), not 50272 log-probs.
    assert parts["teacher_signal"] == 32 * 256 * 5120 * 4
    assert parts["total"] == sum(value for key, value in parts.items() if key != "total") < 80 * 2**30
    signal = opt_plan["stages"][1]["memory"]["teacher_signal"]
    assert signal["mode"] == "hidden" and signal["bytes_per_round"] == {
        "exact": 256 * 256 * 50272 * 4, "hidden": 256 * 256 * 5120 * 4, "topk": 256 * 256 * (64 * 12 + 4)}
    learner = opt_plan["stages"][1]["memory"]["learner"]
    assert learner["minillm"]["teacher_head_bytes_per_gpu"] == 4 * 50272 * 5120  # OPT's head has no bias
    assert learner["sft"]["teacher_head_bytes_per_gpu"] == 0


def test_teacher_signal_mode_follows_the_teachers_head(in_repo):
    exact = build_plan([STUDENT], ["sampling.teacher_dist=exact", "sampling.teacher_dist_dtype=bfloat16"],
                       placeholder_cluster(2, 8))["stages"][0]["memory"]
    assert exact["teacher_signal"]["mode"] == "exact" and exact["learner"]["minillm"]["teacher_head_bytes_per_gpu"] == 0
    assert exact["rollout_worker"]["bytes"]["teacher_signal"] == 32 * 256 * 50272 * 2


def test_zero3_and_zero2_estimates_within_10_percent_of_deepspeed(opt_plan):
    zero3, zero2 = _ds_estimators()
    teacher_sft = opt_plan["stages"][0]["memory"]["learner"]["sft"]
    assert (teacher_sft["zero_stage"], teacher_sft["precision"]) == (3, "bf16")
    _, ds_gpu, _ = zero3(*PUBLISHED["opt-13b"], num_gpus_per_node=8, num_nodes=2, cpu_offload=False,
                         cpu_offload_params=False)
    assert abs(teacher_sft["model_state_bytes_per_gpu"] / ds_gpu - 1) < 0.10
    for phase in ("sft", "minillm"):
        student = opt_plan["stages"][1]["memory"]["learner"][phase]
        assert student["zero_stage"] == 2
        _, ds_gpu = zero2(PUBLISHED["opt-1.3b"][0], num_gpus_per_node=8, num_nodes=1, cpu_offload=False)
        assert abs(student["model_state_bytes_per_gpu"] / ds_gpu - 1) < 0.10


@pytest.mark.parametrize("ds_file, offload", [("zero3_bf16.json", False), ("zero3_fp16.json", False),
                                              ("zero3_offload_bf16.json", True)])
def test_student_under_zero3_matches_deepspeed(in_repo, ds_file, offload):
    zero3, _ = _ds_estimators()
    plan = build_plan([STUDENT], [f"runtime.deepspeed_config=ds_configs/{ds_file}"], placeholder_cluster(2, 8))
    memory = plan["stages"][0]["memory"]["learner"]["minillm"]
    assert (memory["zero_stage"], memory["offload_optimizer"], memory["offload_params"]) == (3, offload, offload)
    _, ds_gpu, _ = zero3(*PUBLISHED["opt-1.3b"], num_gpus_per_node=8, num_nodes=1, cpu_offload=offload,
                         cpu_offload_params=offload)
    assert abs(memory["model_state_bytes_per_gpu"] / ds_gpu - 1) < 0.10


def test_roles_that_do_not_fit_are_refused(in_repo):
    with pytest.raises(ValueError, match=r"runtime.num_rollout_workers=8 x runtime.worker_gpus=1 GPUs do not fit "
                                         r"on the 0 GPUs left after 8 learners"):
        build_plan([STUDENT], [], placeholder_cluster(1, 8))
    with pytest.raises(ValueError, match=r"runtime.num_learners=16 learner ranks need 16 GPUs; the cluster has 8"):
        build_plan([TEACHER_SFT], [], placeholder_cluster(1, 8))


def test_hostfile_names_the_hosts_and_bad_lines_are_refused(in_repo, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\ngpu-a slots=8\ngpu-b slots=8\n")
    plan = build_plan([STUDENT], [], read_hostfile(str(hostfile)))
    launch = next(c for c in plan["stages"][0]["commands"] if c["argv"][0] == "deepspeed")
    assert launch["argv"][1:3] == ["--hostfile", str(hostfile)] and launch["host"] == "gpu-a"
    hostfile.write_text("gpu-a slots=8\ngpu-b 8\n")
    with pytest.raises(ValueError, match=r"hostfile:2: expected 'HOST slots=N', got 'gpu-b 8'"):
        read_hostfile(str(hostfile))


def test_cpu_plan_runs_the_cli_itself(in_repo):
    plan = build_plan([STUDENT], ["runtime.worker_gpus=0"], placeholder_cluster(1, 0))
    (command,) = plan["stages"][0]["commands"]
    assert command["env"] == {"DS_ACCELERATOR": "cpu"} and command["argv"][:4] == [
        "minillm-rl", "train", "--config", STUDENT]


def test_execute_without_gpus_fails_clearly_and_runs_nothing(in_repo, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", "")  # were a command started, it could not be found: exit 127, not this error
    code = cli.main(["plan", "--config", TEACHER_SFT, "--nodes", "2", "--gpus-per-node", "8", "--execute"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("minillm-rl: run failed: the plan places learners and workers on 16 GPUs, but this "
                          "machine sees no CUDA GPU")


def test_plan_prints_and_applies_the_balance_advice_of_a_measured_run(in_repo, tmp_path, capsys):
    """``--calibrate RUN_DIR`` prints the workers that balance the learners from the run's measured
    busy times; ``--balance`` gives the last recipe that many workers for its own learner count."""
    from minillm_rl.config import RunConfig

    run = tmp_path / "calibration-run"
    run.mkdir()
    cfg = RunConfig()
    cfg.model.teacher, cfg.model.student, cfg.data.train = "teacher-dir", "student-dir", "sharegpt"
    cfg.train.num_rollouts, cfg.runtime.num_rollout_workers, cfg.runtime.num_learners = 16, 1, 1
    cfg.save(run / "config.yaml")
    # A worker: 16 samples in 8 s (2/s); the learner: 16 in 2 s (8/s) -> 4 workers per learner rank.
    rounds = [{"stage": "minillm", "time/round": 9.0, "time/worker_busy": 8.0, "time/learner_busy": 2.0}] * 3
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))

    assert cli.main(["plan", "--config", STUDENT, "--nodes", "2", "--gpus-per-node", "8", "--calibrate", str(run)]) == 0
    printed = capsys.readouterr().out
    assert f"balance (measured in {run}): a rollout worker generates 2 samples/s" in printed
    assert "use 4 (4 per learner)" in printed and "--balance sizes" in printed
    assert "rollout workers: 8 x" in printed  # the recipe's own count, untouched without --balance

    learners = load_config(STUDENT).runtime.num_learners
    assert cli.main(["plan", "--config", STUDENT, "--nodes", "6", "--gpus-per-node", "8", "--calibrate", str(run),
                     "--balance", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["balance"]["recommended_workers"] == 4 and plan["balance"]["applied"] is True
    assert plan["stages"][0]["roles"]["rollout_workers"]["count"] == 4 * learners

    assert cli.main(["plan", "--config", STUDENT, "--balance"]) == 2
    assert "--balance sizes the rollout workers from measured rates" in capsys.readouterr().err


def test_plan_estimates_rollout_decode_with_the_lazy_cost_model(in_repo, capsys):
    """The rollout estimate says which mixing it assumes and uses its forward counts: lazy runs the
    teacher alpha T + 1 - alpha times per batch (0.2 x 256 + 0.8 = 52) instead of T = 256."""
    assert cli.main(["plan", "--config", STUDENT, "--nodes", "2", "--gpus-per-node", "8"]) == 0
    printed = capsys.readouterr().out
    assert ("rollout decode, lazy mixing cost model (sampling.mixing; alpha 0.2, 256 new tokens): per rollout batch "
            "52.0 teacher + 205.0 student forwards (every step: 256 + 256)") in printed
    plan = build_plan([STUDENT], [], placeholder_cluster(2, 8))
    cost = plan["stages"][0]["rollout_cost"]
    teacher, student = (plan["stages"][0]["models"][m]["num_params"] for m in ("teacher", "student"))
    assert cost["weight_bytes"]["lazy"] == pytest.approx((52.0 * teacher + 205.0 * student) * 2)  # bf16 workers
    assert cost["weight_bytes"]["every_step"] == 256 * (teacher + student) * 2
    every = build_plan([STUDENT], ["sampling.mixing=every_step", "sampling.alpha=0"], placeholder_cluster(2, 8))
    assert every["stages"][0]["rollout_cost"]["forwards"]["every_step"] == {"teacher": 1.0, "student": 256.0}
    assert every["stages"][0]["rollout_cost"]["mixing"] == "every_step"
