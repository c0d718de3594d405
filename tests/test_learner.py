"""The DeepSpeed learner on CPU: data-parallel and ZeRO-stage equivalences on fixed rollouts, the
weight export, checkpoint resume, and the config / launcher checks.

One round of rollouts is sampled here and saved; every learner run (``tests/ds_learner_script.py``)
trains the same saved student on it, so the runs differ only in world size and ZeRO stage.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minillm_rl.algorithm.batching import left_pad
from minillm_rl.runtime.learner import pick_free_port, launcher_env, resolve_ds_config
from minillm_rl.algorithm.sampler import SamplingConfig, sample_rollouts
from minillm_rl.config import OptimConfig
from minillm_rl.algorithm.engine import TorchEngine, lr_factor

from ds_learner_script import train_rounds  # tests/

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "ds_learner_script.py"
# One xdist group (make test: --dist loadgroup): its tests share the DeepSpeed runs of the module
# fixture `runs`.
pytestmark = pytest.mark.xdist_group("test_learner")
DS_CONFIGS = REPO / "ds_configs"
EOS = 1
ROUNDS = 3
ROLLOUTS = 16
OPTIM = {"lr": 5e-3, "betas": (0.9, 0.95), "weight_decay": 1e-6, "warmup_steps": 8, "lr_schedule": "constant",
         "grad_clip": 1.0}
SAMPLING = {"alpha": 0.2, "max_new_tokens": 8}
PPO_EPOCHS = 2
SEED = 7


def tiny_llama(seed: int, tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.3, pad_token_id=0, bos_token_id=0, eos_token_id=EOS,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).float().eval()


@pytest.fixture(scope="module")
def learner_data(tmp_path_factory) -> tuple[Path, dict]:
    """The saved student (tied LM head), one round of rollouts and the training settings."""
    torch.set_num_threads(2)
    student, teacher = tiny_llama(seed=0, tied=True), tiny_llama(seed=1, tied=False)
    prompts = [[2 + (i * 3 + j) % 4 for j in range(1 + i % 4)] for i in range(ROLLOUTS)]
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id=0)
    rollout = sample_rollouts(student, teacher, prompt_ids, prompt_mask, SamplingConfig(**SAMPLING),
                              eos_token_id=EOS, pad_token_id=0, generator=torch.Generator().manual_seed(SEED))
    # PT corpus: 10 blocks, so the global micro-batches of 8 wrap around it differently each step.
    pt_blocks = torch.randint(2, 6, (10, 6), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        pt_teacher_logprobs = torch.log_softmax(teacher(input_ids=pt_blocks).logits[:, :-1].float(), -1)
    data = {"student_config": student.config.to_dict(), "student_state": student.state_dict(),
            "rollout": rollout, "sampling": SAMPLING, "optim": OPTIM, "ppo_epochs": PPO_EPOCHS, "seed": SEED,
            "pt_blocks": pt_blocks, "pt_teacher_logprobs": pt_teacher_logprobs}
    path = tmp_path_factory.mktemp("learner") / "data.pt"
    torch.save(data, path)
    return path, data


def _run(command: list[str], timeout: int = 240) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


@pytest.fixture(scope="module")
def runs(learner_data, tmp_path_factory) -> dict[str, dict]:
    """Rank-0 results of: 1 process x micro 8 (no launcher), 2 ranks x micro 4 under ZeRO-2 and
    under ZeRO-3 (the latter also saves, continues and resumes a checkpoint)."""
    data_path, _ = learner_data
    out = tmp_path_factory.mktemp("runs")
    plans = {
        "zero2_1x8": ([sys.executable, str(SCRIPT)], "zero2_fp32_cpu.json", 8, []),
        "zero2_2x4": (["deepspeed", "--num_gpus", "2"], "zero2_fp32_cpu.json", 4, []),
        "zero3_2x4": (["deepspeed", "--num_gpus", "2"], "zero3_fp32_cpu.json", 4,
                      ["--checkpoint-dir", str(out / "checkpoints")]),
    }
    results = {}
    for name, (launcher, config, micro, extra) in plans.items():
        port = None
        if launcher[0] == "deepspeed":
            port = pick_free_port()
            launcher = [*launcher, "--master_port", str(port), str(SCRIPT)]
        _run([*launcher, "--data", str(data_path), "--ds-config", str(DS_CONFIGS / config),
              "--micro-batch-size", str(micro), "--rounds", str(ROUNDS), "--out", str(out / f"{name}.pt"), *extra])
        results[name] = torch.load(out / f"{name}.pt", weights_only=False)
        results[name]["master_port"] = port
    return results


def test_two_rank_runs_leave_no_shared_memory_behind(runs):
    """DeepSpeed's CPU all-reduce workspace in /dev/shm (one per rank, named after the run's master
    port) is gone once the ranks have exited (learner._unlink_shm_workspace)."""
    ports = [result["master_port"] for result in runs.values() if result["master_port"] is not None]
    assert len(ports) == 2
    left = [path.name for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")
            if any(path.name.endswith(f"_{port}_0") or path.name.endswith(f"_{port}_1") for port in ports)]
    assert not left


def _assert_same_training(a: dict, b: dict) -> None:
    losses_a = torch.tensor([step["loss"] for step in a["history"]], dtype=torch.float64)
    losses_b = torch.tensor([step["loss"] for step in b["history"]], dtype=torch.float64)
    assert len(losses_a) == ROUNDS * PPO_EPOCHS * ROLLOUTS // 8
    torch.testing.assert_close(losses_a, losses_b, rtol=0, atol=1e-4)
    assert a["export"].keys() == b["export"].keys()
    for name in a["export"]:
        torch.testing.assert_close(a["export"][name], b["export"][name], rtol=0, atol=1e-5, msg=name)


def test_rollouts_have_uneven_lengths_so_token_weighting_matters(learner_data):
    lengths = learner_data[1]["rollout"].response_mask.sum(-1)
    assert len(set(lengths.tolist())) >= 3, lengths


def test_two_ranks_micro4_equal_one_rank_micro8(runs):
    assert runs["zero2_1x8"]["world_size"] == 1 and runs["zero2_2x4"]["world_size"] == 2
    _assert_same_training(runs["zero2_1x8"], runs["zero2_2x4"])


def test_zero3_equals_zero2(runs):
    _assert_same_training(runs["zero2_2x4"], runs["zero3_2x4"])


def test_training_moved_the_weights_and_followed_the_schedule(runs, learner_data):
    """Guards the equivalences against a vacuous pass (nothing trained) and pins the LR schedule."""
    history = runs["zero3_2x4"]["history"]
    optim = OptimConfig(**OPTIM)
    assert [step["lr"] for step in history] == pytest.approx([OPTIM["lr"] * lr_factor(s, optim)
                                                             for s in range(len(history))], rel=1e-12)
    initial = learner_data[1]["student_state"]["model.embed_tokens.weight"]
    assert (runs["zero3_2x4"]["export"]["model.embed_tokens.weight"] - initial).abs().max() > 1e-3


def test_deepspeed_equals_the_single_process_torch_engine(runs, learner_data):
    """Same rollouts and PT batches, same seeded shuffles, same AdamW and schedule without
    DeepSpeed: the learner and the single-process loop are one code path."""
    torch.set_num_threads(2)
    _, data = learner_data
    student = LlamaForCausalLM(LlamaConfig(**data["student_config"]))
    student.load_state_dict(data["student_state"])
    student.float().eval()
    engine = TorchEngine(student, OptimConfig(**OPTIM))
    history = train_rounds(engine, {**data, "micro_batch_size": 8}, ROUNDS, torch.Generator().manual_seed(SEED))
    assert all(step["pt/soft_ce"] > 0 for step in history)
    export = {name: param.detach().clone() for name, param in student.named_parameters()}
    _assert_same_training({"history": history, "export": export}, runs["zero2_1x8"])


def test_zero3_export_is_complete_fp32_with_tied_weights_once(runs, learner_data):
    export = runs["zero3_2x4"]["export"]
    student = tiny_llama(seed=0, tied=True)
    assert list(export) == [name for name, _ in student.named_parameters()]
    assert "lm_head.weight" not in export and "model.embed_tokens.weight" in export
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in export.values())
    assert {name: t.shape for name, t in export.items()} == {n: p.shape for n, p in student.named_parameters()}


def test_checkpoint_resume_reproduces_the_continued_run(runs):
    """A fresh ZeRO-3 engine loaded from the checkpoint (optimizer moments, LR schedule, client
    RNG state) trains the next round exactly as the engine that kept going."""
    result = runs["zero3_2x4"]
    saved_steps, resumed_steps = result["resumed_global_steps"]
    assert saved_steps == resumed_steps == ROUNDS * PPO_EPOCHS * ROLLOUTS // 8
    continued = [step["loss"] for step in result["continued_history"]]
    assert [step["loss"] for step in result["resumed_history"]] == pytest.approx(continued, abs=1e-6)
    assert [step["lr"] for step in result["resumed_history"]] == [step["lr"] for step in result["continued_history"]]
    for name, tensor in result["continued_export"].items():
        torch.testing.assert_close(result["resumed_export"][name], tensor, rtol=0, atol=1e-6, msg=name)


# ---- config and launcher checks (no processes launched) -------------------------------------

@pytest.mark.parametrize("path", sorted(DS_CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_ds_configs_resolve(path):
    config = resolve_ds_config(path, OptimConfig(), micro_batch_size=4, world_size=2)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["train_batch_size"] == 8
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage"] in (1, 2, 3)


@pytest.mark.parametrize("override, message", [
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu=8 contradicts"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2 contradicts"),
    ({"train_batch_size": 4}, "train_batch_size=4 contradicts"),
    ({"gradient_clipping": 0.5}, "gradient_clipping=0.5 contradicts optim.grad_clip=1.0"),
    ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
])
def test_contradicting_ds_config_is_refused(tmp_path, override, message):
    config = {**json.loads((DS_CONFIGS / "zero2_fp32_cpu.json").read_text()), **override}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"ds config .*bad\.json: .*{message}"):
        resolve_ds_config(path, OptimConfig(grad_clip=1.0), micro_batch_size=4, world_size=2)


def test_broken_ds_config_file_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON at line 3"):
        resolve_ds_config(path, OptimConfig(), 4, 1)
    with pytest.raises(ValueError, match="file not found"):
        resolve_ds_config(tmp_path / "missing.json", OptimConfig(), 4, 1)


def test_picked_ports_are_outside_the_kernels_ephemeral_range():
    low, high = (int(value) for value in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(50):
        port = pick_free_port()
        assert not low <= port <= high
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_launcher_env_for_srun_torchrun_and_no_launcher():
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.5"}
    assert launcher_env(slurm) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5",
                                   "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert launcher_env({**slurm, "MASTER_ADDR": "node1", "MASTER_PORT": "29500"})["RANK"] == "3"
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert launcher_env({**torchrun, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}
    # No launcher: a world of one with an in-process store, so no port that another process can take.
    assert launcher_env({}) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    with pytest.raises(ValueError, match="MASTER_PORT=None"):
        launcher_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(ValueError, match="RANK=2 must be < WORLD_SIZE=2"):
        launcher_env({**torchrun, "RANK": "2"})
    with pytest.raises(ValueError, match="srun launch: set MASTER_ADDR"):
        launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


ZERO3_CONSTRUCTION_SCRIPT = """
import sys, torch
sys.path.insert(0, "tests")
from tiny_assets import write_assets
from minillm_rl.config import OptimConfig
from minillm_rl.runtime.learner import build_engine, export_student_state, init_distributed, resolve_ds_config, zero3_construction
from minillm_rl.models import load_causal_lm
init_distributed(120)
student = write_assets(sys.argv[1])["student"]
optim = OptimConfig(lr=1e-4, warmup_steps=0)
config = resolve_ds_config("ds_configs/zero3_fp32_cpu.json", optim, 2, 1)
with zero3_construction(config):
    model = load_causal_lm(student)
assert all(p.numel() == 0 and p.ds_numel > 0 for p in model.parameters()), "built whole, not partitioned"
state = export_student_state(build_engine(model, config, optim, 2))
reference = load_causal_lm(student).state_dict()
assert state and all(torch.equal(value, reference[name]) for name, value in state.items()), "weights differ"
print("ok")
"""


def test_zero3_builds_the_student_partitioned_with_the_checkpoint_weights(tmp_path):
    """Under ZeRO-3 no rank may hold the whole student: ``zero3_construction`` must build it
    partitioned (empty local tensors) and still load exactly the checkpoint's weights."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", ZERO3_CONSTRUCTION_SCRIPT, str(tmp_path / "assets")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ---- how learner processes end ----------------------------------------------------------------

EXIT_SCRIPT = """
import atexit, ctypes, sys
import torch.distributed as dist
from minillm_rl.cli import __main__ as entry



class ReportsFinalization:
    def __del__(self):
        print("interpreter finalized", flush=True)


kept_until_finalization = ReportsFinalization()
atexit.register(print, "exit handler ran")
mode = sys.argv[1]


def cli_main():
    if mode != "no process group":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    print("python text without newline", end="")
    ctypes.CDLL(None).printf(b"native printf text\\n")  # held in C's stdio buffer: stdout is a pipe
    if mode == "raises":
        raise RuntimeError("boom")
    return 3


entry.main = cli_main
entry.run()
"""


@pytest.mark.parametrize("mode, code", [("process group", 3), ("raises", 1), ("no process group", 3)])
def test_cli_process_with_a_process_group_ends_without_interpreter_finalization(mode, code):
    """``minillm-rl`` (``cli/__main__.py:run``) ends a process that joined a process group through
    ``exit_learner_process``: exit handlers run and every buffer reaches the pipe, the exit code
    is kept (1 with the traceback after an unexpected exception), but the interpreter is not
    finalized, so no gloo worker thread can collide with it (tests/gloo_finalization_abort.py).
    Without a process group the process exits normally, finalization included."""
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, mode], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == code, done.stderr[-3000:]
    for text in ("python text without newline", "native printf text", "exit handler ran"):
        assert text in done.stdout, (text, done.stdout, done.stderr[-3000:])
    assert ("interpreter finalized" in done.stdout) == (mode == "no process group"), done.stdout
    assert ("RuntimeError: boom" in done.stderr) == (mode == "raises"), done.stderr[-3000:]
