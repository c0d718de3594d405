"""``minillm-rl train`` end to end on CPU: SFT -> MiniLLM with Ray rollout workers, a replay
store and DeepSpeed learners, plus preemption/resume; and the coordinator's pure helpers.

The runs use ``launch/recipes/tiny-e2e.yaml`` on tiny Llamas (tests/tiny_assets.py): 48 training
and 8 validation prompts, 6 SFT steps, 3 MiniLLM rounds of 2 optimizer steps. The end-to-end runs
use 2 learner ranks (the CLI starts them under ``deepspeed``); the resume runs use 1 rank to keep
the file's wall time down (the resume logic is rank-independent: every rank loads the same
checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from minillm_rl.runtime.checkpointing import checkpoint_problem, checkpoint_tags, read_manifest_summary
from minillm_rl.runtime.checkpointing import checkpoint_tag, parse_checkpoint_tag
from minillm_rl.runtime.rounds import (
    canonical_order,
    concat_rollouts,
    crossed_interval,
    round_prompt_indices,
    split_evenly,
)
from minillm_rl.runtime.replay import ReplayItem
from minillm_rl.algorithm.sampler import Rollout

sys.path.insert(0, str(Path(__file__).parent))
from tiny_assets import write_assets

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "launch" / "recipes" / "tiny-e2e.yaml"
SFT_STEPS = 6  # 48 training examples / sft.batch_size 8, one epoch
EXIT_PREEMPTED = 3


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------

def _rollout(prompts: list[list[int]], responses: list[list[int]], version: int = 0, vocab: int = 5) -> Rollout:
    """A rollout whose per-token values encode (row, position) so padding mistakes show."""
    batch, width, length = len(prompts), max(map(len, prompts)), max(map(len, responses))
    prompt_ids = torch.full((batch, width), 0, dtype=torch.long)
    prompt_mask = torch.zeros(batch, width, dtype=torch.long)
    response_ids = torch.full((batch, length), 0, dtype=torch.long)
    response_mask = torch.zeros(batch, length)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt_ids[row, width - len(prompt):] = torch.tensor(prompt)
        prompt_mask[row, width - len(prompt):] = 1
        response_ids[row, : len(response)] = torch.tensor(response)
        response_mask[row, : len(response)] = 1
    values = (torch.arange(length, dtype=torch.float32) + 1) * response_mask + torch.tensor(
        [float(sum(r)) for r in responses])[:, None] * response_mask
    dist = torch.log_softmax(torch.arange(batch * length * vocab, dtype=torch.float32).reshape(batch, length, vocab),
                             -1) * response_mask[..., None]
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, values, -values, values * 2, values * 3,
                   dist, None, None, alpha=0.2, policy_version=version)


def _rows(rollout: Rollout) -> list[tuple]:
    """Each row without its padding: (prompt tokens, response tokens, per-token values, dist)."""
    rows = []
    for row in range(rollout.response_ids.shape[0]):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row] > 0].tolist()
        keep = rollout.response_mask[row] > 0
        rows.append((prompt, rollout.response_ids[row][keep].tolist(), rollout.student_logprobs[row][keep].tolist(),
                     rollout.teacher_logprobs_raw[row][keep].tolist(),
                     rollout.teacher_dist_logprobs[row][keep].flatten().tolist()))
    return rows


def test_concat_rollouts_repads_every_field_without_changing_any_row():
    first = _rollout([[1, 2, 3], [4]], [[5, 1], [6, 7, 8, 1]], version=3)
    second = _rollout([[2, 2, 2, 2, 2]], [[3]], version=2)
    merged = concat_rollouts([first, second], pad_token_id=0)
    assert merged.prompt_ids.shape == (3, 5) and merged.response_ids.shape == (3, 4)
    assert merged.teacher_dist_logprobs.shape == (3, 4, 5)
    assert _rows(merged) == _rows(first) + _rows(second)
    # Prompts stay right-aligned (left padding) with the pad id; values are 0 where masked.
    assert merged.prompt_ids[1].tolist() == [0, 0, 0, 0, 4] and merged.prompt_mask[1].tolist() == [0, 0, 0, 0, 1]
    assert merged.response_ids[2].tolist() == [3, 0, 0, 0]
    assert torch.all(merged.student_logprobs[merged.response_mask == 0] == 0)
    assert torch.all(merged.teacher_dist_logprobs[merged.response_mask == 0] == 0)
    assert merged.policy_version == 2 and merged.alpha == 0.2


def test_canonical_order_does_not_depend_on_arrival_order():
    rollouts = [_rollout([[1, 2]], [[3]]), _rollout([[1]], [[4, 5]]), _rollout([[2]], [[1]]),
                _rollout([[1, 2]], [[3]], version=1)]
    items = [ReplayItem(r, r.policy_version, 1, 0) for r in rollouts]
    expected = [id(item) for item in canonical_order(items)]
    for permutation in ([3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
        assert [id(item) for item in canonical_order([items[i] for i in permutation])] == expected
    assert canonical_order(items)[-1].policy_version == 1  # older versions first


def test_round_prompts_cover_every_prompt_once_per_epoch_even_across_round_edges():
    num_prompts, per_round = 10, 4  # rounds straddle epoch boundaries
    positions = [i for r in range(5) for i in round_prompt_indices(7, r, per_round, num_prompts)]
    assert sorted(positions[:10]) == list(range(10)) and sorted(positions[10:20]) == list(range(10))
    assert positions[:10] != positions[10:20]  # a new permutation each epoch
    assert round_prompt_indices(7, 3, per_round, num_prompts) == positions[12:16]  # pure function of the round


def test_small_helpers():
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1], 2) == [[1]]
    assert parse_checkpoint_tag(checkpoint_tag(1, "minillm", 42)) == (1, "minillm", 42)
    assert min(checkpoint_tag(1, "minillm", 2), checkpoint_tag(0, "sft", 10)).startswith("phase0")
    assert [s for s in range(1, 10) if crossed_interval(s - 1, s, 3)] == [3, 6, 9]
    assert crossed_interval(2, 4, 3) and not crossed_interval(3, 5, 3)


# --------------------------------------------------------------------------------------------
# End to end through the CLI
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory, shared_ray):
    """The tiny models and data (tests/tiny_assets.py), and the Ray head the runs join."""
    return {**write_assets(tmp_path_factory.mktemp("tiny_assets")), "ray": shared_ray}


def _train_command(assets, out: Path, *overrides: str, resume: str | None = None) -> tuple[list[str], dict]:
    """``(argv, env)`` of a ``minillm-rl train`` run of the tiny recipe into ``out``, on the shared
    Ray head (``runtime.ray_address=local`` among ``overrides`` starts one of the run's own)."""
    args = [sys.executable, "-m", "minillm_rl.cli", "train", "--config", str(RECIPE),
            f"model.teacher={assets['teacher']}", f"model.student={assets['student']}",
            f"data.train={assets['data']}", f"output.dir={out}", f"runtime.ray_address={assets['ray']['address']}",
            *overrides]
    if resume is not None:
        args += ["--resume", resume]
    env = {**os.environ, **assets["ray"]["env"], "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return args, env


def _train(assets, out: Path, *overrides: str, resume: str | None = None,
           timeout: int = 240) -> subprocess.CompletedProcess:
    args, env = _train_command(assets, out, *overrides, resume=resume)
    result = subprocess.run(args, check=False, cwd=REPO, env=env, capture_output=True, timeout=timeout)
    # Decoded here, not by text=True: its universal newlines would turn a progress bar's '\r' into '\n'.
    result.stdout, result.stderr = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    return result


def _check_ok(result: subprocess.CompletedProcess, expected: int = 0) -> None:
    assert result.returncode == expected, result.stdout[-3000:] + result.stderr[-3000:]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


@pytest.mark.parametrize("ds_config, max_staleness, pt_corpus, test_stage", [
    ("zero2_fp32_cpu.json", 0, False, True), ("zero3_fp32_cpu.json", 1, True, False)])
def test_two_rank_sft_then_minillm_selects_the_logged_best(assets, tmp_path, monkeypatch, ds_config, max_staleness,
                                                           pt_corpus, test_stage):
    out = tmp_path / "run"
    # The PT term here with top-K teacher scores (the stop/resume runs below cover hidden states).
    pt = (f"data.pretrain_corpus=[{assets['corpus']}]", "sampling.teacher_dist=topk",
          "sampling.teacher_topk=4", "sft.eval_interval=2") if pt_corpus else ()
    test = ("eval.num_test=6", "eval.test_seeds=1", "eval.max_new_tokens=8", "eval.side_by_side=2",
            "output.report_to=[tensorboard,wandb]") if test_stage else ()
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B without a network
    overrides = (f"runtime.deepspeed_config=ds_configs/{ds_config}", f"runtime.max_staleness={max_staleness}",
                 "train.optim.lr=0.01", *pt, *test)
    result = _train(assets, out, *overrides, timeout=480)
    _check_ok(result)
    # The runtime is what ran, and its log reads as lines in a file: no carriage-return frames.
    assert "starting 2 Ray rollout worker(s)" in result.stdout and "DeepSpeed engine over 2 learner rank(s)" in result.stdout
    assert "\r" not in result.stdout + result.stderr
    # The end of the phase says how many workers would balance generation and learning (measured).
    assert re.search(r"minillm: balance: a rollout worker generates \S+ samples/s, the 2 learner rank\(s\) learn "
                     r"\S+ samples/s: \S+ worker\(s\) balance them; use \d+", result.stdout), result.stdout[-2000:]
    if test_stage:
        _check_test_stage(out, result.stdout)
        _check_finished_run_is_kept(assets, out, overrides)
    summary = json.loads((out / "run_summary.json").read_text())
    sft_steps = (48 - 6) // 8 if test_stage else SFT_STEPS  # 6 of the 48 training examples held out for the test
    assert summary["world_size"] == 2 and summary["total_steps"] == sft_steps + 6

    records = _metrics(out)
    scored = [r for r in records if r["stage"] == "minillm" and "validation_rouge_l" in r]
    best = json.loads((out / "best.json").read_text())
    assert [r["step"] for r in scored] == [0, 4, 6]  # the SFT init, eval_interval 3 crossed at 4, phase end
    # The SFT init is scored (step 0) but is not a MiniLLM checkpoint (eval.select_initial false):
    # the best of the phase's own checkpoints, however the init scored.
    candidates = [r for r in scored if r["step"] > 0]
    top = max(candidates, key=lambda r: r["validation_rouge_l"])
    assert best["phase"] == "minillm" and best["protocol"].startswith("validation")
    assert best["validation_rouge_l"] == top["validation_rouge_l"]
    assert best["step"] == min(r["step"] for r in candidates if r["validation_rouge_l"] == top["validation_rouge_l"])
    best_model = AutoModelForCausalLM.from_pretrained(out / "best")
    assert best_model.config.num_hidden_layers == 1
    if best["step"] == 6:  # selected the last weights: best/ must be exactly final/
        final = _weights(out / "final")
        assert all(torch.equal(value, final[name]) for name, value in best_model.state_dict().items())

    # SFT init = lowest validation loss.
    sft_losses = [(r["validation_loss"], r["step"]) for r in records if "validation_loss" in r]
    assert summary["best_validation_loss"] == min(sft_losses)[0]
    # SFT validates every sft.eval_interval steps when set, else every train.eval_interval (3).
    assert [step for _, step in sft_losses] == ([2, 4, 6] if pt_corpus else [3, sft_steps])

    # Replay accounting balances; rollouts are never staler than max_staleness.
    replay = summary["replay"]
    assert replay["produced"] == replay["consumed"] + replay["dropped_stale"] + replay["lost_on_restore"] \
        + replay["in_store_samples"]
    rounds = [r for r in records if "round" in r]
    assert [r["round"] for r in rounds] == [0, 1, 2] and replay["consumed"] == 3 * 8
    for r in rounds:
        assert r["learner_policy_version"] == r["round"]
        assert r["learner_policy_version"] - max_staleness <= r["rollout_policy_version/min"]
        assert r["rollout_policy_version/max"] <= r["learner_policy_version"]
        if max_staleness == 0:
            assert r["rollout_policy_version/min"] == r["learner_policy_version"]
    assert all(("pt/soft_ce" in r) == pt_corpus for r in rounds)
    if max_staleness == 1:  # overlapped: rounds after the first were generated one version back
        assert [r["rollout_policy_version/min"] for r in rounds] == [0, 0, 1]


def _check_test_stage(out: Path, stdout: str) -> None:
    """The test stage of a run (eval.num_test=6, one seed, two prompts side by side) and W&B offline."""
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert 1 <= len(answers) <= 6
    assert all(set(a) == {"prompt", "reference", "teacher", "SFT init", "MiniLLM"} for a in answers)
    results_md = (out / "results.md").read_text()
    side = results_md.split("## Answers side by side")[1]
    assert side.count("### Prompt ") == min(2, len(answers))
    for name in ("reference", "teacher", "SFT init", "MiniLLM"):
        assert f"| {name} |" in side
    assert "## Paired differences" in results_md and "MiniLLM" in results_md
    models = {model["name"]: model for model in json.loads((out / "results.json").read_text())["models"]}
    assert list(models) == ["teacher", "SFT init", "MiniLLM"]
    assert models["MiniLLM"]["dir"] == str(out / "eval") and models["SFT init"]["source"] == str(out / "sft_best_loss")
    assert "reverse_kl" in models["MiniLLM"]["metrics"]
    assert "reverse_kl" not in models["teacher"]["metrics"]  # judged by itself it would be 0
    assert json.loads((out / "eval" / "results.json").read_text())["num_examples"] == len(answers)
    assert (out / "curves.png").is_file() and f"results: {out / 'results.md'}" in stdout
    # The log counts every split; each exported model records the prompt template it was trained with.
    assert re.search(r"data: test: \d+ kept of 6 \(\d+ prompts over 64 tokens dropped", stdout)
    assert re.search(r"data: validation: 8 kept of 8 ", stdout) and "data: loaded 56 examples" in stdout
    for name in ("best", "final", "sft_best_loss"):
        assert json.loads((out / name / "prompt_format.json").read_text())["template"] == "minillm"
    # W&B offline: the run's files under wandb/, one run id kept for resumes.
    assert list((out / "wandb").glob("offline-run-*")) and (out / "wandb_run_id").is_file()


def _check_finished_run_is_kept(assets, out: Path, overrides: tuple[str, ...]) -> None:
    """The same command again is refused (exit 2, nothing touched); resumed, the finished run
    says which checkpoint it resumed from and keeps its test results instead of redoing them."""
    tested = {name: (out / name).stat().st_mtime_ns for name in ("results.json", "eval/results.json", "answers.jsonl")}
    again = _train(assets, out, *overrides, timeout=120)
    assert again.returncode == 2 and f"output.dir: {out} holds a previous run" in again.stderr, again.stderr[-2000:]
    resumed = _train(assets, out, *overrides, resume="auto", timeout=480)
    _check_ok(resumed)
    assert re.search(rf"--resume auto: resuming from {re.escape(str(out / 'checkpoints'))}/phase1-minillm-step\d+ ",
                     resumed.stdout), resumed.stdout[-2000:]
    assert "test stage: skipped: resumed from a finished run" in resumed.stdout
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in tested.items())


def _one_learner(assets) -> tuple[str, ...]:
    """The settings of the stop/resume runs: one learner, and the PT term on the tiny corpus, so
    its block order and teacher calls must resume exactly too; the teacher signal as hidden
    states (what ``auto`` gives this teacher): rollouts and the PT term's teacher scores travel
    as hidden states and the learner applies the teacher head it read from the checkpoint."""
    return ("runtime.num_learners=1", "train.optim.lr=0.01", f"data.pretrain_corpus=[{assets['corpus']}]",
            "sampling.teacher_dist=hidden")


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    _check_ok(_train(assets, out, *_one_learner(assets)))
    return out


@pytest.mark.xdist_group("resumed_like_uninterrupted")  # they share the `uninterrupted` run
def test_run_preempted_twice_resumes_to_the_same_weights_and_best(assets, tmp_path, uninterrupted):
    """Stopped at the last SFT step (the SFT -> MiniLLM boundary), resumed and stopped again inside
    MiniLLM after its first round, resumed to the end: the three processes end as one."""
    out = tmp_path / "run"
    for stop_after, expected_tag, resume in ((SFT_STEPS, "phase0-sft-step00000006", None),
                                             (SFT_STEPS + 2, "phase1-minillm-step00000002", "auto")):
        stopped = _train(assets, out, *_one_learner(assets), f"runtime.stop_after_steps={stop_after}", resume=resume)
        _check_ok(stopped, EXIT_PREEMPTED)
        assert (out / "checkpoints" / "latest").read_text().strip() == expected_tag
        assert not (out / "final").exists()

    _check_ok(_train(assets, out, *_one_learner(assets), resume="auto"))
    _assert_resumed_like(out, uninterrupted)


def _assert_resumed_like(out: Path, uninterrupted: Path) -> None:
    """A stopped-then-resumed run in ``out`` ended exactly as the uninterrupted run."""
    reference, resumed = _weights(uninterrupted / "final"), _weights(out / "final")
    assert reference.keys() == resumed.keys()
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0, msg=name)
    assert json.loads((out / "best.json").read_text()) == json.loads((uninterrupted / "best.json").read_text())
    # The resumed process continued from the checkpoint instead of starting over: every SFT
    # step and MiniLLM round was logged exactly once over the processes.
    records = _metrics(out)
    assert [r["step"] for r in records if r["stage"] == "sft" and "loss" in r] == list(range(1, SFT_STEPS + 1))
    rounds = [r for r in records if "round" in r]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["pt/soft_ce"] > 0 and r["pt/ce"] > 0 for r in rounds)  # the PT term ran, with the teacher
    assert all(r["single/kl"] > 0 for r in rounds)  # the single-step term, from the shipped hidden states
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["total_steps"] == SFT_STEPS + 6 and summary["replay"]["consumed"] == 3 * 8
    assert summary["replay"]["produced"] == summary["replay"]["consumed"]


def _logged_sft_steps(out: Path) -> list[int]:
    """SFT steps in ``metrics.jsonl`` while a run is writing it (a partial last line is skipped)."""
    steps = []
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["stage"] == "sft" and "loss" in record:
            steps.append(record["step"])
    return steps


@pytest.mark.xdist_group("resumed_like_uninterrupted")  # they share the `uninterrupted` run
def test_signal_stops_with_verified_checkpoints_that_resume_exactly_even_if_the_newest_is_corrupt(
        assets, tmp_path, uninterrupted):
    """SIGUSR1 (then SIGTERM, as a second signal while stopping) mid-SFT: exit 3 after a
    checkpoint at the next step boundary; ``--resume auto`` ends as the uninterrupted run. A copy
    whose newest checkpoint has a flipped byte resumes from the previous one, with one warning."""
    out = tmp_path / "run"
    args, env = _train_command(assets, out, *_one_learner(assets))
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240  # a hang guard, not a timing assertion
        # After SFT step 4 the step-3 checkpoint (train.eval_interval 3) is complete, so the stop
        # leaves at least two checkpoints.
        while not _logged_sft_steps(out) or max(_logged_sft_steps(out)) < 4:
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no SFT step 4 logged"
            time.sleep(0.2)
        process.send_signal(signal.SIGUSR1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "SIGUSR1 received; checkpointing at the next step boundary" in stderr
    assert "SIGTERM received; checkpointing at the next step boundary" in stderr
    assert not (out / "final").exists()
    tags = checkpoint_tags(out / "checkpoints")
    assert len(tags) >= 2 and all(checkpoint_problem(out / "checkpoints" / tag) is None for tag in tags)
    stopped_at = int(re.search(r"stopped after (\d+) optimizer steps \(SIG", stdout).group(1))
    assert read_manifest_summary(out / "checkpoints" / tags[0])["progress"]["total_steps"] == stopped_at >= 4

    corrupt = tmp_path / "corrupt"
    shutil.copytree(out, corrupt)
    model_file = corrupt / "checkpoints" / tags[0] / "mp_rank_00_model_states.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))

    _check_ok(_train(assets, out, *_one_learner(assets), resume="auto"))
    _assert_resumed_like(out, uninterrupted)

    previous = corrupt / "checkpoints" / tags[1]
    previous_steps = read_manifest_summary(previous)["progress"]["total_steps"]
    result = _train(assets, corrupt, *_one_learner(assets),
                    f"runtime.stop_after_steps={previous_steps + 1}", resume="auto")
    _check_ok(result, EXIT_PREEMPTED)
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "sha256 mismatch" in warnings[0] and tags[0] in warnings[0]
    assert warnings[0].endswith(f"using previous good checkpoint {previous}")
    # It went on from the previous checkpoint: one more step (SFT) or round (MiniLLM) after it.
    resumed_to = int(re.search(r"stopped after (\d+) optimizer steps", result.stdout).group(1))
    assert previous_steps < resumed_to <= previous_steps + 2


def test_bad_config_is_one_line_exit_2_and_writes_nothing(assets, tmp_path):
    out = tmp_path / "run"
    result = _train(assets, out, "sampling.alpha=1.5", timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sampling.alpha" in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()


def test_mismatched_tokenizers_are_refused(assets, tmp_path):
    from tiny_assets import tiny_llama, tiny_tokenizer, word_tokenizer

    other = tmp_path / "other_teacher"
    word_tokenizer(["x", "y"]).save_pretrained(other)
    tiny_llama(len(tiny_tokenizer()), 1, 0, 0.1).save_pretrained(other)
    out = tmp_path / "run"
    result = _train(assets, out, "runtime.num_learners=1", f"model.teacher={other}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("minillm-rl: error:")]
    assert len(error) == 1 and "tokenizers differ" in error[0] and "Traceback" not in result.stderr
    assert not out.exists()


def test_sft_only_validation_is_generated_by_both_zero3_ranks(assets, tmp_path):
    """No rollout workers: each learner rank generates its strided share of the validation prompts
    with its ZeRO-3 module (collective forwards); the logged Rouge-L at the end equals the one of
    ``final/`` generated here with the same shares and per-rank seeds."""
    from minillm_rl.data import load_instructions, split_validation, tokenize_examples
    from minillm_rl.evaluation.protocol import EvalConfig, evaluate, generate_responses
    from minillm_rl.models import load_causal_lm, load_tokenizer
    from minillm_rl.runtime.rounds import derived_seed

    out = tmp_path / "run"
    # 7 prompts: rank 1 pads its share with a copy, so both ranks run the same collective forwards.
    _check_ok(_train(assets, out, "train.phases=[sft]", "runtime.deepspeed_config=ds_configs/zero3_fp32_cpu.json",
                     "data.num_validation=7"))
    best = json.loads((out / "best.json").read_text())
    assert best["protocol"].endswith("split over 2 learner ranks")
    logged = [r for r in _metrics(out) if "validation_rouge_l" in r]
    assert [r["step"] for r in logged] == [3, SFT_STEPS]

    tokenizer = load_tokenizer(assets["student"])
    _, valid = split_validation(load_instructions(str(assets["data"])).examples, 7, 0)
    valid, _ = tokenize_examples(valid, tokenizer, 64, 16, template="minillm")
    assert len(valid) == 7
    references = [[tokenizer.decode(e.response_ids, skip_special_tokens=True).strip()] for e in valid]
    cfg = EvalConfig.validation(max_new_tokens=8, seed=1)
    final = load_causal_lm(out / "final").eval()

    def by_two_ranks(prompts, seed):  # each share padded to 4 with the first prompt: the batch the rank drew
        texts = [""] * len(prompts)
        for rank in range(2):
            share = prompts[rank::2]
            texts[rank::2] = generate_responses(final, tokenizer, share + [prompts[0]] * (4 - len(share)), cfg,
                                                derived_seed(seed, "validation", rank))[: len(share)]
        return texts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count: the same reduction order
    try:
        expected = evaluate(None, tokenizer, valid, references, cfg, generate=by_two_ranks).rouge_l
    finally:
        torch.set_num_threads(threads)
    assert logged[-1]["validation_rouge_l"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("phase", ["seqkd", "kd"])
def test_baselines_train_on_the_teachers_targets(assets, tmp_path, phase):
    """The first logged loss (before any update) must be the loss of the initial student on the
    teacher's targets: seqkd on the teacher's samples (not the human answers), kd with the
    teacher's distribution mixed into the CE."""
    from minillm_rl.algorithm.batching import collate_supervised
    from minillm_rl.runtime.rounds import derived_seed, epoch_order, split_evenly
    from minillm_rl.data import load_instructions, split_validation, tokenize_examples
    from minillm_rl.algorithm.forward import response_logits
    from minillm_rl.models import load_causal_lm, load_tokenizer
    from minillm_rl.algorithm.sampler import SamplingConfig
    from minillm_rl.runtime.rollout.worker import RolloutWorker
    from minillm_rl.algorithm.supervised import supervised_micro_batch_loss

    out = tmp_path / "run"
    # SeqKD's targets are generated in one shard per rollout worker (seeded by shard): 2 of them.
    workers = 2 if phase == "seqkd" else 1
    _check_ok(_train(assets, out, "runtime.num_learners=1", f"runtime.num_rollout_workers={workers}",
                     f"train.phases=[{phase}]"))
    tokenizer = load_tokenizer(assets["student"])
    train, _ = split_validation(load_instructions(str(assets["data"])).examples, 8, 0)
    train, _ = tokenize_examples(train, tokenizer, 64, 16, template="minillm")
    rows = epoch_order(1, "sft", 0, len(train))[:8]  # train.seed 1, first global batch of 8
    student, teacher = load_causal_lm(assets["student"]), load_causal_lm(assets["teacher"])
    human = collate_supervised([train[i].prompt_ids for i in rows], [train[i].response_ids for i in rows], 0)
    with torch.no_grad():
        human_ce = supervised_micro_batch_loss(student, human)[0].item()
        if phase == "seqkd":
            targets = [json.loads(line)["response_ids"] for line in (out / "seqkd_targets.jsonl").read_text().splitlines()]
            worker = RolloutWorker(assets["teacher"], assets["student"], assets["student"])
            sampling = SamplingConfig(alpha=1.0, max_new_tokens=8, teacher_dist="none")
            expected = []
            for shard_index, shard in enumerate(split_evenly([e.prompt_ids for e in train], workers)):
                rollout = worker.generate(shard, sampling, derived_seed(1, "seqkd", shard_index), -1)
                expected += [ids[mask > 0].tolist() for ids, mask in zip(rollout.response_ids, rollout.response_mask)]
            assert targets == expected
            assert sum(t != e.response_ids for t, e in zip(targets, train)) > len(train) // 2
            batch = collate_supervised([train[i].prompt_ids for i in rows], [targets[i] for i in rows], 0)
            expected_loss = supervised_micro_batch_loss(student, batch)[0].item()
        else:
            teacher_logprobs = torch.log_softmax(response_logits(teacher, human.prompt_ids, human.prompt_mask,
                                                                 human.response_ids, human.response_mask), -1)
            expected_loss = supervised_micro_batch_loss(student, human, teacher_logprobs, kd_ratio=0.5)[0].item()
    first = next(r for r in _metrics(out) if r["stage"] == phase and "loss" in r)
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(expected_loss, abs=1e-5)
    assert abs(expected_loss - human_ce) > 1e-3  # the check above could tell the two apart
    assert json.loads((out / "best.json").read_text())["phase"] == phase
