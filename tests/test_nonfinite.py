"""Non-finite loss or gradient: the step is skipped with weights, optimizer state and LR schedule
untouched, counted, and too many in a row stop the run (TorchEngine in-process; DeepSpeed ZeRO-2
and ZeRO-3 on one CPU rank in a subprocess)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm_rl.algorithm.batching import collate_supervised
from minillm_rl.config import OptimConfig
from minillm_rl.runtime.run import Progress, advance_progress
from minillm_rl.errors import RunFailed
from minillm_rl.algorithm.engine import TorchEngine
from minillm_rl.algorithm.ppo import apply_optimizer_step, token_mean_backward
from minillm_rl.algorithm.supervised import supervised_micro_batch_loss

REPO = Path(__file__).resolve().parents[1]
EOS = 1
BATCH = collate_supervised([[2, 3, 4], [5, 6]], [[7, EOS], [3, 2, EOS]], pad_token_id=0)


def _nan_gradient(engine, loss):
    """A finite loss whose gradient is NaN in one parameter (as a bad kernel would produce)."""
    first = next(engine.module.parameters())
    handle = first.register_hook(lambda grad: grad * math.nan)
    return loss, handle


def _infinite_loss_finite_gradient(engine, loss):
    """An infinite loss whose gradient is finite: only the loss check can catch it."""
    return loss + torch.tensor(math.inf), None


def _train_step(engine, corrupt=None) -> tuple[float, bool]:
    loss, _ = supervised_micro_batch_loss(engine, BATCH)
    handle = None
    if corrupt is not None:
        loss, handle = corrupt(engine, loss)
    global_loss, _ = token_mean_backward(engine, loss, BATCH.response_mask.sum())
    applied = apply_optimizer_step(engine)
    if handle is not None:
        handle.remove()
    return global_loss, applied


def _snapshot(engine) -> tuple[dict, dict, float]:
    weights = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    optimizer = {key: value.clone() if torch.is_tensor(value) else value
                 for state in engine.optimizer.state.values() for key, value in state.items()}
    return weights, optimizer, engine.get_lr()[0]


def _assert_same(a: tuple[dict, dict, float], b: tuple[dict, dict, float]) -> None:
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1].keys() == b[1].keys() and all(torch.equal(torch.as_tensor(a[1][k]), torch.as_tensor(b[1][k]))
                                              for k in a[1])
    assert a[2] == b[2]


@pytest.mark.parametrize("corrupt", [_nan_gradient, _infinite_loss_finite_gradient],
                         ids=["nan-gradient", "inf-loss-finite-gradient"])
def test_torch_engine_skips_a_non_finite_step_bit_exactly(tiny_lm, corrupt):
    model = tiny_lm("llama", 12).train()
    engine = TorchEngine(model, OptimConfig(lr=1e-2, warmup_steps=3))
    assert _train_step(engine)[1]  # a real step first, so the AdamW moments are non-trivial
    before = _snapshot(engine)
    global_loss, applied = _train_step(engine, corrupt)
    assert not applied and engine.skipped_steps == 1
    _assert_same(before, _snapshot(engine))
    assert _train_step(engine)[1]  # the next good step is applied
    assert not torch.equal(before[0]["lm_head.weight"], model.lm_head.weight)


def test_streak_of_skipped_steps_stops_the_run_naming_the_last_good_checkpoint():
    progress = Progress(phase_step=10, total_steps=10)
    advance_progress(progress, [True, False, False, True, False], "minillm", 3, Path("ckpt/phase1-minillm-step00000010"))
    assert (progress.phase_step, progress.total_steps) == (15, 15)  # skipped steps still consume their data
    assert (progress.nonfinite_skipped, progress.nonfinite_streak) == (3, 1)
    advance_progress(progress, [False], "minillm", 3, None)
    with pytest.raises(RunFailed, match=r"^3 non-finite steps in a row at minillm step 17 "
                                        r"\(runtime.max_nonfinite_streak=3\); last good checkpoint: ckpt/phase1"):
        advance_progress(progress, [False, True], "minillm", 3, Path("ckpt/phase1-minillm-step00000010"))
    assert progress.nonfinite_skipped == 5


# One rank, no launcher: a ZeRO engine over a tiny Llama; a NaN-gradient step and an infinite-loss
# step must leave the exported weights and the LR untouched, and a good step must still apply.
DEEPSPEED_SCRIPT = """
import math, sys, torch
sys.path.insert(0, "tests")
from conftest import make_tiny_lm
from test_nonfinite import BATCH, _infinite_loss_finite_gradient, _nan_gradient, _train_step
from minillm_rl.config import OptimConfig
from minillm_rl.runtime.learner import build_engine, export_student_state, init_distributed

init_distributed(timeout_s=120)
for config in sys.argv[1:]:
    engine = build_engine(make_tiny_lm("llama", 12).train(), config, OptimConfig(lr=1e-2, warmup_steps=3), 2)
    assert _train_step(engine)[1]
    before, lr = export_student_state(engine), engine.get_lr()[0]
    for corrupt in (_nan_gradient, _infinite_loss_finite_gradient):
        assert not _train_step(engine, corrupt)[1], (config, corrupt.__name__)
        after = export_student_state(engine)
        assert all(torch.equal(before[k], after[k]) for k in before), (config, corrupt.__name__)
        assert engine.get_lr()[0] == lr
    assert _train_step(engine)[1]
    assert not torch.equal(before["lm_head.weight"], export_student_state(engine)["lm_head.weight"])
    assert engine.skipped_steps == 2
print("ok")
"""


def test_deepspeed_zero2_and_zero3_skip_non_finite_steps():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    configs = [str(REPO / "ds_configs" / name) for name in ("zero2_fp32_cpu.json", "zero3_fp32_cpu.json")]
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT, *configs], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]
