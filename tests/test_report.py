"""``minillm-rl report``: the table's numbers from synthetic run directories, the curves PNG,
and one-line errors for directories it cannot read."""

from __future__ import annotations

import json
import random
import re
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from minillm_rl.cli import main
from minillm_rl.evaluation.protocol import METRICS, EvalResult, interval_cell, write_eval_outputs
from minillm_rl.evaluation.report import build_report, metric_series, read_metrics
from minillm_rl.evaluation.stats import bootstrap_mean, paired_difference

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps({"time": 0.0, **record}) + "\n")


def _eval_result(per_seed: list[float], exact: float) -> EvalResult:
    mean = sum(per_seed) / len(per_seed)
    return EvalResult("test", 4, mean, 0.0, per_seed, exact, 0.0, [exact] * len(per_seed),
                      settings={"seeds": list(range(len(per_seed)))})


def _train_run(root: Path, name: str, phases: list[str], valid_scores: dict[int, float],
               test_per_seed: list[float] | None, with_best_json: bool = True) -> Path:
    """A `minillm-rl train` directory: config.yaml, metrics.jsonl, best.json, best/, eval/."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"phases": phases, "seed": 1}}))
    stage = phases[-1]
    records = []
    for step in range(1, 7):
        record = {"stage": stage, "step": step, "loss": 1.0 / step}
        if stage == "minillm":
            record.update({"reward/mean": -2.0 + 0.1 * step, "reverse_kl/per_token": 1.0 - 0.1 * step,
                           "response_len/mean": 10.0 + step})
        records.append(record)
    records += [{"stage": stage, "step": step, "validation_rouge_l": score} for step, score in valid_scores.items()]
    _write_metrics(run_dir, records)
    (run_dir / "best").mkdir()
    if with_best_json:
        step, score = max(valid_scores.items(), key=lambda item: item[1])
        (run_dir / "best.json").write_text(json.dumps({"phase": stage, "step": step, "validation_rouge_l": score}))
    if test_per_seed is not None:
        write_eval_outputs(_eval_result(test_per_seed, exact=1.5), run_dir / "eval", name=str(run_dir / "best"))
    return run_dir


def _row(table: str, model: str) -> list[str]:
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == model:
            return cells
    raise AssertionError(f"no row {model!r} in\n{table}")


def _column(table: str, name: str) -> int:
    return [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")].index(name)


def _assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000  # four panels with lines, not an empty canvas
    assert data[12:16] == b"IHDR" and data.rstrip(b"\x00")[-8:-4] == b"IEND"


def test_report_table_numbers_and_curves(tmp_path):
    teacher = write_eval_outputs(_eval_result([30.0, 32.0], exact=3.0), tmp_path / "teacher-eval", name="teacher-dir")
    sft = _train_run(tmp_path, "sft-run", ["sft"], {3: 11.0, 6: 12.5}, [10.0, 12.0])
    # Two training seeds of one method, merged under one name.
    minillm_a = _train_run(tmp_path, "minillm-s1", ["sft", "minillm"], {2: 14.0, 4: 17.0, 6: 16.0}, [20.0, 22.0])
    minillm_b = _train_run(tmp_path, "minillm-s2", ["sft", "minillm"], {2: 15.0, 4: 18.0}, [24.0, 26.0],
                           with_best_json=False)
    report = build_report([f"teacher={teacher}", str(sft), f"MiniLLM={minillm_a}", f"MiniLLM={minillm_b}"],
                          tmp_path / "report")
    text = report.report_path.read_text()
    assert report.table in text
    test_col, exact_col = _column(report.table, "test Rouge-L"), _column(report.table, "exact match")
    best_col, step_col = _column(report.table, "best valid Rouge-L"), _column(report.table, "best step")
    teacher_row = _row(report.table, "teacher")
    assert teacher_row[test_col] == "31.00 ± 1.00" and teacher_row[exact_col] == "3.00"
    assert teacher_row[best_col] == "" and "teacher-dir" in teacher_row  # the evaluated model
    sft_row = _row(report.table, "SFT")  # named after train.phases
    assert sft_row[test_col] == "11.00 ± 1.00" and sft_row[best_col] == "12.50" and sft_row[step_col] == "6"
    minillm_row = _row(report.table, "MiniLLM")
    # Mean of the two runs' means (21, 25) ± their std; the best validation over both runs (run b
    # has no best.json: taken from its logged validation scores).
    assert minillm_row[test_col] == "23.00 ± 2.00" and minillm_row[exact_col] == "1.50"
    assert minillm_row[best_col] == "18.00" and minillm_row[step_col] == "4"
    assert minillm_row[_column(report.table, "test runs × seeds")] == "2 × 2"
    assert str(minillm_a) in minillm_row[-1] and str(minillm_b) in minillm_row[-1]
    assert [line.split("|")[1].strip() for line in report.table.splitlines()[2:]] == ["teacher", "SFT", "MiniLLM"]
    assert report.curves_path == tmp_path / "report" / "curves.png"
    _assert_valid_png(report.curves_path)


def test_resumed_steps_keep_the_last_value_and_cut_last_line_is_ignored(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run, [{"stage": "minillm", "step": 2, "reward/mean": 1.0},
                         {"stage": "minillm", "step": 4, "reward/mean": 2.0},
                         {"stage": "minillm", "step": 4, "reward/mean": 3.0, "flag": True}])  # resumed
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"stage": "minillm", "st')  # killed mid-write
    series = metric_series(read_metrics(run / "metrics.jsonl"))
    assert series == {"minillm": {"reward/mean": [(2, 1.0), (4, 3.0)]}}
    (run / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\nnot json\n{"stage": "sft", "step": 2}\n')
    with pytest.raises(ValueError, match=re.escape(f"{run / 'metrics.jsonl'}:2: malformed JSON")):
        read_metrics(run / "metrics.jsonl")


def test_unreadable_run_directories_are_one_line_errors(tmp_path, capsys):
    no_metrics = tmp_path / "no-metrics"
    no_metrics.mkdir()
    (no_metrics / "config.yaml").write_text(yaml.safe_dump({"train": {"phases": ["sft"]}}))
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "results.json").write_text("{")
    cases = [(no_metrics, f"{no_metrics}: no metrics.jsonl"), (empty, f"{empty}: no metrics.jsonl or results.json"),
             (corrupt, f"{corrupt / 'results.json'}: corrupt"), (tmp_path / "missing", "not a directory")]
    for run_dir, expected in cases:
        assert main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("minillm-rl: error: ") and expected in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing written when a run cannot be read


def test_report_cli_prints_table_and_paths(tmp_path, capsys):
    run = _train_run(tmp_path, "kd-run", ["kd"], {5: 7.25}, [7.0])
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\| KD \| 7\.00 ± 0\.00 \| 1\.50 \| 1 × 1 \| 7\.25 \| 5 \|", printed)
    assert str(tmp_path / "out" / "report.md") in printed and str(tmp_path / "out" / "curves.png") in printed
    # Eval directories only: no curves, and both the terminal and report.md say so.
    assert main(["report", f"KD={run / 'eval'}", "--out", str(tmp_path / "evals")]) == 0
    assert "(no curves: none of the directories is a train run)" in capsys.readouterr().out
    assert not (tmp_path / "evals" / "curves.png").exists()
    assert "No training curves" in (tmp_path / "evals" / "report.md").read_text()


# ---------------------------------------------------------------- distillation metrics, paired differences

def _scored_eval(path: Path, per_prompt: dict[str, list[float | None]], prompt_keys: list[str]) -> Path:
    """An eval directory whose results carry per-prompt values (as `minillm-rl eval` writes them)."""
    result = _eval_result([10.0], exact=0.0)
    result.per_prompt, result.prompt_keys = per_prompt, prompt_keys
    result.metrics = {key: bootstrap_mean(values).to_dict() for key, values in per_prompt.items()}
    result.settings["bootstrap"] = {"resamples": 1000, "confidence": 0.95, "seed": 0}
    return write_eval_outputs(result, path)


def _per_prompt(seed: int, shift: float, num: int = 30) -> dict[str, list[float | None]]:
    shared, rng = random.Random(99), random.Random(seed)
    difficulty = [shared.gauss(0, 1) for _ in range(num)]  # the prompts' difficulty, the same for every run
    return {"reverse_kl": [2.0 + shift + d + rng.gauss(0, 0.1) for d in difficulty],
            "distinct_2": [None if i % 7 == 0 else 90.0 + shift + rng.gauss(0, 1) for i in range(num)]}


def _cell(table: str, metric: str, column: str) -> str:
    return _row(table, metric)[_column(table, column)]


def test_metrics_table_and_paired_differences_from_per_prompt_values(tmp_path, capsys):
    keys = [f"{i:016x}" for i in range(30)]
    teacher = _per_prompt(0, 0.0)
    del teacher["reverse_kl"]  # the teacher evaluated without --teacher: no reverse KL of its own
    sft, minillm_a, minillm_b = _per_prompt(1, 0.5), _per_prompt(2, -0.4), _per_prompt(3, -0.2)
    runs = [f"teacher={_scored_eval(tmp_path / 't', teacher, keys)}", f"SFT={_scored_eval(tmp_path / 's', sft, keys)}",
            f"MiniLLM={_scored_eval(tmp_path / 'm1', minillm_a, keys)}",
            f"MiniLLM={_scored_eval(tmp_path / 'm2', minillm_b, keys)}"]
    report = build_report(runs, tmp_path / "report", baseline="SFT")
    kl, distinct = METRICS["reverse_kl"], METRICS["distinct_2"]
    # The two MiniLLM runs are averaged prompt by prompt, then bootstrapped over prompts.
    merged = {key: [(a + b) / 2 if a is not None else None for a, b in zip(minillm_a[key], minillm_b[key])]
              for key in minillm_a}
    assert _cell(report.metrics_table, kl, "MiniLLM") == interval_cell(bootstrap_mean(merged["reverse_kl"]).to_dict())
    assert _cell(report.metrics_table, kl, "teacher") == ""
    assert _cell(report.metrics_table, distinct, "teacher") == interval_cell(
        bootstrap_mean(teacher["distinct_2"]).to_dict())
    difference = paired_difference(merged["reverse_kl"], sft["reverse_kl"])
    assert _cell(report.differences_table, kl, "MiniLLM − SFT") == interval_cell(difference.to_dict())
    # Shared prompt difficulty cancels: the paired interval excludes 0 and is far narrower than
    # either model's own interval.
    assert difference.high < 0 and difference.mean == pytest.approx(
        statistics.fmean(merged["reverse_kl"]) - statistics.fmean(sft["reverse_kl"]))
    own = bootstrap_mean(sft["reverse_kl"])
    assert difference.high - difference.low < (own.high - own.low) / 3
    assert _cell(report.differences_table, kl, "teacher − SFT") == ""  # undefined on one side
    assert _cell(report.differences_table, distinct, "teacher − SFT") == interval_cell(
        paired_difference(teacher["distinct_2"], sft["distinct_2"]).to_dict())
    text = report.report_path.read_text()
    assert report.metrics_table in text and report.differences_table in text and "over 30 prompts" in text
    # Default baseline: the first name.
    assert main(["report", *runs, "--out", str(tmp_path / "default")]) == 0
    printed = capsys.readouterr().out
    assert "| metric | SFT − teacher | MiniLLM − teacher |" in printed and "| metric | teacher | SFT | MiniLLM |" in printed


def test_runs_on_other_prompts_or_an_unknown_baseline_are_one_line_errors(tmp_path, capsys):
    keys = [f"{i:016x}" for i in range(30)]
    a = _scored_eval(tmp_path / "a", _per_prompt(1, 0.0), keys)
    b = _scored_eval(tmp_path / "b", _per_prompt(2, 0.0), keys[:3] + ["ffffffffffffffff"] + keys[4:])
    short = _scored_eval(tmp_path / "c", {k: v[:29] for k, v in _per_prompt(3, 0.0).items()}, keys[:29])
    old = write_eval_outputs(_eval_result([10.0], exact=0.0), tmp_path / "old")  # no per-prompt values
    cases = [([f"A={a}", f"B={b}"], f"{b}: its 30 evaluated prompts differ from the 30 of {a} (first difference "
                                    "at prompt 3)"),
             ([f"A={a}", f"C={short}"], f"{short}: its 29 evaluated prompts differ"),
             ([f"A={a}", f"B={a}", "--baseline", "SFT"], "--baseline SFT: no run of that name has per-prompt "
                                                          "metrics; expected one of ['A', 'B']"),
             ([str(old), "--baseline", "SFT"], "--baseline SFT: no run has per-prompt metrics")]
    for arguments, expected in cases:
        assert main(["report", *arguments, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("minillm-rl: error: ") and expected in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad"
    _scored_eval(bad, {"reverse_kl": [1.0, 2.0]}, keys)
    assert main(["report", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "per_prompt['reverse_kl'] is not 30 numbers" in capsys.readouterr().err


# ---------------------------------------------------------------- bench/bench_quality.py (plan, resume)

def _bench_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module  # dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    return module


def test_bench_quality_plan_equalises_the_budget_and_sets_each_ablation(tmp_path):
    from minillm_rl.config import load_config

    bench = _bench_module()
    common = ["model.teacher=t", "model.student=s", "data.train=d"]
    base = load_config(str(bench.RECIPE), common)
    num_train = 1000
    runs = bench.plan_runs(tmp_path, base, num_train, seeds=[1, 2], epochs=3, sft_epochs=2)
    # 8 methods and one shared SFT init per seed, each trained before the MiniLLM variants using it.
    assert len(runs) == (8 + 1) * 2 and len({run.run_dir for run in runs}) == 18
    assert [run.reported for run in runs].count(False) == 2
    # The two tables: main = the four methods; ablations = MiniLLM (the same runs) and its variants.
    names = {table: {run.name for run in bench.plan_runs(tmp_path, base, num_train, [1], 3, 2, table=table)}
             for table in bench.TABLES}
    assert names["main"] == {"SFT", "KD", "SeqKD", "MiniLLM", bench.SFT_INIT}
    assert names["main"] & names["ablations"] == {"MiniLLM", bench.SFT_INIT} and len(names["ablations"]) == 6
    for index, run in enumerate(runs):
        assert run.init is None or run.init in runs[:index]
    configs = {run: load_config(str(bench.RECIPE), [*common, *run.overrides]) for run in runs}
    one_round = base.train.num_rollouts * base.train.ppo_epochs
    supervised = 3 * (num_train // base.sft.batch_size) * base.sft.batch_size
    for run in filter(lambda run: run.reported, runs):
        # Every method gets the supervised runs' budget (MiniLLM, its SFT init included: up to one round less).
        sequences = sum(bench.budget_sequences(configs[part], num_train) for part in (run, run.init) if part)
        assert supervised - one_round < sequences <= supervised, run.name
        assert configs[run].output.dir.startswith(str(tmp_path / "runs"))
    by_name = {run.name: configs[run] for run in runs if run.run_dir.name.endswith("seed2")}
    assert by_name["SFT"].train.phases == ["sft"] and by_name["SeqKD"].train.phases == ["seqkd"]
    init = by_name[bench.SFT_INIT]
    assert init.train.phases == ["sft"] and init.sft.num_epochs == 2 and init.train.seed == 2
    minillm_variants = [run for run in runs if run.name.startswith("MiniLLM") and run.run_dir.name.endswith("seed2")]
    assert len(minillm_variants) == 5
    for run in minillm_variants:
        # Each variant starts from the same seed's SFT init, so the switch is the only difference.
        assert configs[run].train.phases == ["minillm"] and configs[run].train.seed == 2
        assert configs[run].model.student == str(Path(init.output.dir) / "sft_best_loss")
    assert by_name["MiniLLM"].sampling.alpha == base.sampling.alpha > 0
    assert by_name["MiniLLM w/o teacher-mixed sampling"].sampling.alpha == 0
    assert by_name["MiniLLM w/o length normalisation"].advantage.length_normalize is False
    # The paper's single-step comparison: the same gradient with r_t only in the single-step term, or
    # only in the reward-to-go; full MiniLLM (the reference) has both.
    decomposed = by_name["MiniLLM, r_t only in the single-step term (decomposed)"]
    undecomposed = by_name["MiniLLM, r_t in the reward-to-go, w/o single-step term"]
    assert (decomposed.advantage.include_current_reward, decomposed.loss.single_step) == (False, True)
    assert (undecomposed.advantage.include_current_reward, undecomposed.loss.single_step) == (True, False)
    assert by_name["MiniLLM"].advantage.length_normalize and by_name["MiniLLM"].loss.single_step
    assert by_name["MiniLLM"].advantage.include_current_reward
    assert base.eval.validation == "test"  # selected under the test protocol
    with pytest.raises(ValueError, match="--sft-epochs 3"):
        bench.plan_runs(tmp_path, base, num_train, [1], epochs=3, sft_epochs=3)
    with pytest.raises(ValueError, match="unknown"):
        bench.plan_runs(tmp_path, base, num_train, [1], 3, 2, methods=["DPO"])


def test_bench_quality_resume_state_and_dry_run_on_tiny_assets(tmp_path, capsys):
    from tiny_assets import write_assets

    bench = _bench_module()
    run_dir = tmp_path / "run"
    assert bench.run_status(run_dir) == "fresh"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("phase0-sft-step00000003")
    assert bench.run_status(run_dir) == "resume"
    (run_dir / "run_summary.json").write_text("{}")
    assert bench.run_status(run_dir) == "done"

    assets = write_assets(tmp_path / "assets", num_examples=40)
    tiny = ["--set", "data.template=minillm", "--set", "data.num_validation=4", "--set", "data.max_prompt_tokens=64",
            "--set", "data.max_length=80", "--set", "sampling.max_new_tokens=8"]
    results = tmp_path / "results"
    args = ["--out", str(tmp_path / "bench"), "--results", str(results), "--teacher", str(assets["teacher"]),
            "--student", str(assets["student"]), "--data", str(assets["data"]), "--num-test", "6", "--seeds", "1",
            "--dry-run", *tiny]
    bench.main(args)
    data_dir = tmp_path / "bench" / "data"
    test_lines = (data_dir / "test.jsonl").read_text().splitlines()
    pool_lines = (data_dir / "train_pool.jsonl").read_text().splitlines()
    assert len(test_lines) == 6 and len(pool_lines) == 34 and not set(test_lines) & set(pool_lines)
    lines = capsys.readouterr().out.splitlines()
    plan = [line for line in lines if "seed1" in line and not line.startswith("bench-quality:")]
    assert len(plan) == 4 + 1 and all(" fresh " in line for line in plan)
    # The units it would start: the teacher's test per test seed first, then the runs; nothing written.
    starts = [line.split("] ")[1].split(":")[0] for line in lines if "would start" in line]
    assert starts == ["teacher/test-seed10", "teacher/test-seed20", "teacher/test-seed30", "sft/seed1", "kd/seed1",
                      "seqkd/seed1", "sft-init/seed1", "minillm/seed1"]
    assert not results.exists()
    # A second invocation keeps the held-out split and the prepared data (resumable).
    before = (data_dir / "prepared" / "prepared.json").stat().st_mtime_ns
    bench.main(args)
    assert (data_dir / "test.jsonl").read_text().splitlines() == test_lines
    assert (data_dir / "prepared" / "prepared.json").stat().st_mtime_ns == before
    # A damaged result file: one line naming it, exit 2, no unit started.
    damaged = results / "quality" / "cpu" / "kd" / "seed1.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text("<<<<<<< HEAD")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        bench.main(args)
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and f"{damaged}: corrupt result file" in captured.err
    assert "would start" not in captured.out


def test_bench_quality_gpu_size_runs_end_to_end_at_tiny_size(tmp_path, shared_ray, monkeypatch, capsys):
    """``--size gpu`` (bf16 ZeRO-2, its batch and length settings) through the real script on tiny
    models on CPU, with the GPU-only placement turned off, in units: with a budget smaller than any
    unit's cost nothing starts; then the teacher's test, SFT and MiniLLM (with its SFT init and the
    PT term) each write their result file (every model evaluated with the distillation metrics, the
    students against the teacher unit's answers); a re-run starts nothing; bench_report builds the
    tables from the result files alone, with the paired differences against SFT."""
    from tiny_assets import write_assets

    bench = _bench_module()
    import bench_report

    assets = write_assets(tmp_path / "assets", num_examples=40)
    out, results = tmp_path / "bench", tmp_path / "results"
    tiny = [f"--set={item}" for item in (
        "runtime.worker_gpus=0", "runtime.worker_threads=1", "data.template=minillm", "data.num_validation=4",
        "data.max_prompt_tokens=64", "data.max_length=80", "sampling.max_new_tokens=8", "eval.max_new_tokens=8",
        "sft.batch_size=8", "sft.micro_batch_size=8", "train.num_rollouts=8", "train.micro_batch_size=8",
        "train.eval_interval=100", "sft.optim.warmup_steps=1", "runtime.rpc_timeout_s=120",
        "runtime.collective_timeout_s=300", f"runtime.ray_address={shared_ray['address']}")]
    for name, value in shared_ray["env"].items():  # the training runs join the shared Ray head
        monkeypatch.setenv(name, value)
    args = ["--size", "gpu", "--out", str(out), "--results", str(results), "--teacher", str(assets["teacher"]),
            "--student", str(assets["student"]), "--data", str(assets["data"]), "--pt-corpus", str(assets["corpus"]),
            "--num-test", "4", "--seeds", "1", "--test-seeds", "1", "--epochs", "2", "--sft-epochs", "1",
            "--methods", "SFT", "MiniLLM", *tiny]
    bench.main([*args, "--budget-minutes", "1"])  # the size's stated estimates are all longer
    assert "0 done now, 0 already done, 1 skipped for budget, 3 blocked by those" in capsys.readouterr().out
    assert not results.exists() and not (out / "runs").exists()
    bench.main(args)
    size_dir = results / "quality" / "gpu"
    assert sorted(str(path.relative_to(size_dir)) for path in size_dir.rglob("*.json")) == [
        "minillm/seed1.json", "sft-init/seed1.json", "sft/seed1.json", "teacher/test-seed1.json"]
    minillm = json.loads((size_dir / "minillm" / "seed1.json").read_text())
    config = minillm["training"]["config"]
    assert config["model"]["dtype"] == "bfloat16" and config["runtime"]["deepspeed_config"].endswith("zero2_bf16.json")
    assert config["data"]["pretrain_corpus"] == [str(assets["corpus"])] and config["eval"]["validation"] == "test"
    assert config["model"]["student"] == str(out / "runs" / "sft-init-seed1" / "sft_best_loss")
    assert minillm["unit"] == "minillm/seed1" and minillm["seed"] == 1
    assert minillm["provenance"]["wall_seconds"] > 0 and minillm["provenance"]["machine"]["cpu_cores"] >= 1
    test = minillm["test"]
    assert {"reverse_kl", "teacher_nll", "student_nll_teacher"} <= set(test["metrics"])
    assert len(test["prompt_keys"]) == 4 and list(test["per_seed"]) == ["1"]
    assert test["per_seed"]["1"]["reverse_kl"] == test["per_prompt"]["reverse_kl"]  # one test seed: its values
    sft = json.loads((size_dir / "sft" / "seed1.json").read_text())
    assert sft["training"]["config"]["data"]["pretrain_corpus"] == [] and sft["test"]["prompt_keys"] == test["prompt_keys"]
    init = json.loads((size_dir / "sft-init" / "seed1.json").read_text())
    assert init["training"]["config"]["sft"]["num_epochs"] == 1 and init["tested_checkpoint"] == "sft_best_loss"
    assert init["test"]["prompt_keys"] == test["prompt_keys"] and minillm["tested_checkpoint"] == "best"
    # The MiniLLM run records the weights it started from: the SFT init's tested checkpoint.
    from minillm_rl.student_manifest import weight_checksums
    assert minillm["init"] == {"unit": "sft-init/seed1",
                               "weights": weight_checksums(out / "runs" / "sft-init-seed1" / "sft_best_loss")}
    teacher = json.loads((size_dir / "teacher" / "test-seed1.json").read_text())
    assert len(teacher["teacher_answer_ids"]) == 4  # the answers every student was judged against
    assert all(abs(value) < 1e-3 for value in teacher["test"]["per_prompt"]["reverse_kl"])  # judged by itself
    # The students' tests used the teacher unit's answers: the first seed's teacher answer per prompt.
    teacher_answers = [json.loads(line)["prediction"] for line in
                       (out / "eval-teacher" / "seed1" / "answers.jsonl").read_text().splitlines()]
    student_view = [json.loads(line)["teacher_answer"] for line in
                    (out / "runs" / "minillm-seed1" / "eval" / "answers.jsonl").read_text().splitlines()]
    assert student_view == teacher_answers
    capsys.readouterr()
    bench.main(args)  # every unit has its result: nothing starts
    assert "0 done now, 4 already done, 0 skipped for budget" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # results of another budget are not reused
        bench.main([item if item != "2" else "3" for item in args])  # --epochs 3
    assert refused.value.code == 2 and "made with epochs=2, this plan has 3" in capsys.readouterr().err
    doc = tmp_path / "docs" / "results.md"
    assert bench_report.main(["--results", str(results), "--out", str(doc)]) == 0
    report = doc.read_text()
    assert "### Paired differences against SFT (1 seed)" in report and "MiniLLM (1 seed) − SFT (1 seed)" in report
    assert "| MiniLLM (1 seed) | 1 (1) |" in report and "| SFT init (1 seed) | 1 (1) |" in report and (tmp_path / "docs" / "bench-quality-gpu-main.png").is_file()


def test_the_table_says_which_checkpoint_each_train_run_is_and_what_minillm_started_from(tmp_path):
    """An SFT run's row is its best-Rouge-L best/, while MiniLLM started from the lowest-loss SFT
    weights: report.md says so, and how to report the SFT init MiniLLM actually started from."""
    sft = _train_run(tmp_path, "sft", ["sft"], {3: 20.0, 6: 21.0}, [20.0])
    minillm = _train_run(tmp_path, "minillm", ["sft", "minillm"], {3: 24.0, 6: 25.0}, [24.0])
    text = build_report([str(sft), str(minillm)], tmp_path / "report").report_path.read_text()
    assert f"SFT ({sft}): best/ = the best validation Rouge-L of its sft phase;" in text
    assert f"MiniLLM ({minillm}): best/ = the best validation Rouge-L of its minillm phase, which started from " \
           f"{minillm / 'sft_best_loss'}" in text
    assert "the SFT row is not the model MiniLLM started from" in text and '"SFT init=RUN/test/sft"' in text
    # A MiniLLM-only run started from model.student; without an SFT-only row there is no warning.
    alone = _train_run(tmp_path, "alone", ["minillm"], {3: 24.0}, [24.0])
    (alone / "config.yaml").write_text(yaml.safe_dump({"train": {"phases": ["minillm"]},
                                                      "model": {"student": "students/s6"}}))
    text = build_report([str(alone)], tmp_path / "report2").report_path.read_text()
    assert "which started from students/s6" in text and "is not the model" not in text


def test_identical_curves_of_two_runs_stay_distinguishable(tmp_path, monkeypatch):
    """Two runs with the same curve: each gets its own line style, so neither hides the other."""
    from matplotlib import pyplot

    from minillm_rl.evaluation.report import RunCurves, plot_curves

    figures = []
    monkeypatch.setattr(pyplot, "close", figures.append)
    series = {"minillm": {"reward/mean": [(1, 0.1), (2, 0.2)]}}
    plot_curves([RunCurves("a", series), RunCurves("b", series)], tmp_path / "curves.png")
    (axis,) = [axis for axis in figures[0].axes if axis.lines]
    assert [line.get_label() for line in axis.lines] == ["a (minillm)", "b (minillm)"]
    assert len({line.get_linestyle() for line in axis.lines}) == 2
