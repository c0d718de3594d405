"""bf16 end to end on CPU: ``minillm-rl train`` with the GPU recipes' bf16 DeepSpeed configs
(``ds_configs/zero2_bf16.json``, ``zero3_bf16.json``, unchanged: DeepSpeed's CPU accelerator runs
bf16), bf16 rollout workers (``model.dtype``) and the teacher distribution shipped in bf16
(``sampling.teacher_dist_dtype``); and the 16-bit mode DeepSpeed's CPU accelerator cannot run
(fp16) refused in one line before anything starts.

Runs of the tiny recipe (tests/tiny_assets.py), kept few because each costs a process start:

- SFT only, fp32, 1 learner: the reference for the bf16 losses;
- SFT only, bf16 ZeRO-2, 2 learners: its losses follow the fp32 ones within a bound argued below;
- SFT -> MiniLLM, bf16 ZeRO-3, 1 learner: uninterrupted, and stopped after the first MiniLLM round
  then resumed with ``--resume auto``; the two end bit-identical.

Every bf16 run's checkpoints hold fp32 master weights that carry more bits than bf16, and the
exported ``final/`` (and ``best/``) are exactly those masters rounded to bf16, written in the
recipe's ``model.dtype``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import (  # noqa: E402  (assets is a fixture)
    EXIT_PREEMPTED,
    SFT_STEPS,
    _check_ok,
    _metrics,
    _train,
    assets,  # noqa: F401
)

BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits: one rounding errs by at most half of this, relative
BF16 = ("model.dtype=bfloat16",)
SLOW_RUN_TIMEOUT_S = 480  # a hang guard for 2-rank runs on a loaded 2-core machine, not a timing assertion


def _saved_dtypes(model_dir: Path) -> tuple[str, set[torch.dtype]]:
    """``(dtype in config.json, dtypes of the saved tensors)`` of an HF model directory."""
    config = json.loads((model_dir / "config.json").read_text())
    with safe_open(model_dir / "model.safetensors", "pt") as tensors:
        return config.get("dtype", config.get("torch_dtype")), {tensors.get_tensor(k).dtype for k in tensors.keys()}


def _saved_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", "pt") as tensors:
        return {name: tensors.get_tensor(name) for name in tensors.keys()}


def _assert_bf16_learner_with_fp32_masters(run: Path, exported: Path) -> None:
    """The newest checkpoint of ``run`` holds fp32 master weights (consolidated over the ZeRO
    partitions by DeepSpeed's own reader) that carry bits bf16 cannot hold, and ``exported`` (the
    HF directory written from the same step) is exactly those masters rounded to bf16."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert any(path.name.startswith("bf16_") for path in (run / "checkpoints" / tag).iterdir()), \
        "DeepSpeed wrote no bf16 optimizer state: the learner did not train in bf16"
    masters = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)
    weights = _saved_tensors(exported)
    assert masters.keys() == weights.keys()
    assert all(master.dtype == torch.float32 for master in masters.values())
    assert any(not torch.equal(master, master.bfloat16().float()) for master in masters.values())
    for name, weight in weights.items():
        assert torch.equal(weight, masters[name].bfloat16()), name


# --------------------------------------------------------------------------------------------
# (a) bf16 losses follow fp32 ones; 2 ranks, ZeRO-2
# --------------------------------------------------------------------------------------------

def _sft_only(assets, out: Path, *overrides: str, timeout: int = SLOW_RUN_TIMEOUT_S):
    return _train(assets, out, "train.phases=[sft]", *overrides, timeout=timeout)


@torch.no_grad()
def _largest_token_ce_rounding(assets) -> float:
    """``b``: the largest change of one training token's cross-entropy when the initial student
    computes in bf16 instead of fp32, over every response token of the SFT data (the tiny
    recipe's split and template)."""
    from minillm_rl.data import load_instructions, split_validation, tokenize_examples
    from minillm_rl.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(assets["student"])
    train, _ = split_validation(load_instructions(str(assets["data"])).examples, 8, 0)
    train, _ = tokenize_examples(train, tokenizer, 64, 16, template="minillm")
    fp32 = load_causal_lm(assets["student"])
    bf16 = load_causal_lm(assets["student"]).bfloat16()
    largest = 0.0
    for example in train:
        ids = torch.tensor([example.prompt_ids + example.response_ids])
        start = len(example.prompt_ids) - 1  # the position predicting the first response token
        targets = ids[0, start + 1:]
        ce = [torch.nn.functional.cross_entropy(model(ids).logits[0, start:-1].float(), targets, reduction="none")
              for model in (fp32, bf16)]
        largest = max(largest, float((ce[1] - ce[0]).abs().max()))
    return largest


def test_bf16_sft_losses_follow_fp32_and_best_is_saved_in_model_dtype(assets, tmp_path):
    fp32_out, bf16_out = tmp_path / "fp32", tmp_path / "bf16"
    _check_ok(_sft_only(assets, fp32_out, "runtime.num_learners=1"))
    _check_ok(_sft_only(assets, bf16_out, "runtime.deepspeed_config=ds_configs/zero2_bf16.json", *BF16))
    assert json.loads((bf16_out / "run_summary.json").read_text())["world_size"] == 2
    reference, bf16 = _metrics(fp32_out), _metrics(bf16_out)
    assert [(r["step"], sorted(r)) for r in reference] == [(r["step"], sorted(r)) for r in bf16]

    # The bound on |L_bf16 - L_fp32| for each logged loss L (a token mean), from bf16's unit
    # roundoff u = 2^-8:
    # - Equal weights: a token's CE = logsumexp(z) - z_y moves by at most 2 max|dz|. Measured here
    #   over every SFT token at the initial weights, the largest such move is b (about 0.01:
    #   ~2 bf16 ulps of this student's logits, |z| < 2). Round-to-nearest errors are zero-mean and
    #   independent across tokens, so by Hoeffding the mean over a batch of n tokens errs by more
    #   than 5 b / sqrt(n) with probability < 2 exp(-12.5) = 7.5e-6 per logged loss.
    # - Drift: the runs' fp32 master weights move apart through the rounding of the gradients
    #   (Adam divides the gradient by its own scale, so a relative error of order u changes each
    #   step by a fraction of order u of lr <= 1e-3); over the 6 steps this moves the loss by far
    #   less than one rounding of the loss itself, u L, which is the allowance.
    # Measured over three pairs of runs (ZeRO-2/ZeRO-3, 1 and 2 ranks): at most 0.065 u L.
    b = _largest_token_ce_rounding(assets)
    fewest_tokens = min(r["tokens"] for r in reference if "tokens" in r)  # the validation set has more
    compared = 0
    for ref, run in zip(reference, bf16):
        for key in ("loss", "validation_loss"):
            if key in ref:
                bound = 5 * b / math.sqrt(fewest_tokens) + BF16_UNIT_ROUNDOFF * ref[key]
                assert abs(run[key] - ref[key]) <= bound, (ref["step"], key, run[key], ref[key], bound)
                compared += 1
    assert compared == SFT_STEPS + 2  # every step, and validation at steps 3 and 6
    assert b < 4 * BF16_UNIT_ROUNDOFF  # the premise: a few ulps of small logits, not a broken forward

    # best/ (the final phase is SFT here) and final/ in the recipe's model.dtype, and equal to the
    # fp32 masters rounded to bf16.
    for exported in ("best", "final"):
        assert _saved_dtypes(bf16_out / exported) == ("bfloat16", {torch.bfloat16}), exported
    assert _saved_dtypes(fp32_out / "best") == ("float32", {torch.float32})
    _assert_bf16_learner_with_fp32_masters(bf16_out, bf16_out / "final")


# --------------------------------------------------------------------------------------------
# (b) resume is exact in bf16; 1 rank, ZeRO-3, bf16 workers and teacher distribution
# --------------------------------------------------------------------------------------------

def _bf16_minillm(assets) -> tuple[str, ...]:
    """bf16 learner (ZeRO-3), bf16 teacher + student copy on the rollout workers, and the exact
    teacher distribution shipped to the learner in bf16."""
    # One rollout worker: resuming exactly across two workers' arrival orders is test_train_e2e's.
    return ("runtime.num_learners=1", "runtime.num_rollout_workers=1",
            "runtime.deepspeed_config=ds_configs/zero3_bf16.json", *BF16,
            "sampling.teacher_dist=exact", "sampling.teacher_dist_dtype=bfloat16", "train.optim.lr=0.01")


@pytest.fixture(scope="module")
def bf16_uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16_uninterrupted") / "run"
    _check_ok(_train(assets, out, *_bf16_minillm(assets), timeout=SLOW_RUN_TIMEOUT_S))
    return out


def test_bf16_run_resumes_bit_identically_and_exports_bf16(assets, tmp_path, bf16_uninterrupted):
    out = tmp_path / "run"
    stopped = _train(assets, out, *_bf16_minillm(assets), f"runtime.stop_after_steps={SFT_STEPS + 2}",
                     timeout=SLOW_RUN_TIMEOUT_S)
    _check_ok(stopped, EXIT_PREEMPTED)
    assert (out / "checkpoints" / "latest").read_text().strip() == "phase1-minillm-step00000002"
    _check_ok(_train(assets, out, *_bf16_minillm(assets), resume="auto", timeout=SLOW_RUN_TIMEOUT_S))

    reference, resumed = _saved_tensors(bf16_uninterrupted / "final"), _saved_tensors(out / "final")
    assert reference.keys() == resumed.keys()
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name  # bf16 bits, not a tolerance
    assert json.loads((out / "best.json").read_text()) == json.loads((bf16_uninterrupted / "best.json").read_text())
    records = _metrics(out)
    assert [r["step"] for r in records if r["stage"] == "sft" and "loss" in r] == list(range(1, SFT_STEPS + 1))
    rounds = [r for r in records if "round" in r]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["loss"] for r in rounds] == [r["loss"] for r in _metrics(bf16_uninterrupted) if "round" in r]

    for run in (bf16_uninterrupted, out):
        for exported in ("best", "final", "sft_best_loss"):
            assert _saved_dtypes(run / exported) == ("bfloat16", {torch.bfloat16}), (run, exported)
    _assert_bf16_learner_with_fp32_masters(bf16_uninterrupted, bf16_uninterrupted / "final")


# --------------------------------------------------------------------------------------------
# What DeepSpeed's CPU accelerator cannot run is refused before anything starts
# --------------------------------------------------------------------------------------------

def test_fp16_on_cpu_is_one_line_exit_2_and_writes_nothing(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("DeepSpeed's CPU accelerator supports fp16 on this CPU (AVX-512 FP16)")
    out = tmp_path / "run"
    result = _train(assets, out, "runtime.deepspeed_config=ds_configs/zero2_fp16.json", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("minillm-rl: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "ds_configs/zero2_fp16.json enables fp16" in errors[0] and "cpu accelerator" in errors[0]
    assert not out.exists()
