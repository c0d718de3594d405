"""bench/units.py (units, result files, budget), bench/bench_report.py (tables from result files alone)
and bench/quality_units.py's plan of units, on synthetic result files. The real end-to-end run of
bench/bench_quality.py is tests/test_report.py::test_bench_quality_gpu_size_runs_end_to_end_at_tiny_size."""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_quality  # noqa: E402
import bench_report  # noqa: E402
import quality_units  # noqa: E402
import units  # noqa: E402

from minillm_rl.evaluation.protocol import interval_cell  # noqa: E402
from minillm_rl.evaluation.report import CURVE_PANELS  # noqa: E402
from minillm_rl.evaluation.stats import bootstrap_mean, paired_difference  # noqa: E402

NUM_PROMPTS = 12
KEYS = [f"prompt{i:02d}" for i in range(NUM_PROMPTS)]


def _write(path: Path, payload: dict, unit: str, kind: str = "k", wall_seconds: float = 60.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": units.RESULT_FORMAT, "version": units.RESULT_VERSION, "unit": unit, "kind": kind, **payload,
              "provenance": {"commit": "0123456789abcdef", "dirty": False, "diff_sha256": None,
                             "wall_seconds": wall_seconds, "started_utc": "2026-12-06T00:00:00+00:00",
                             "machine": {"cpu_cores": 2, "cpu_model": "test cpu", "torch_threads": 2, "gpu": None}}}
    path.write_text(json.dumps(record, indent=2))
    return path


def _test(rng: random.Random, offset: float, seeds: list[int]) -> dict:
    per_prompt = {"rouge_l": [rng.uniform(5, 15) for _ in KEYS],
                  "reverse_kl": [offset + rng.uniform(0, 1) for _ in KEYS],
                  "teacher_nll": [offset + 3 + rng.uniform(0, 1) for _ in KEYS],
                  "student_nll_reference": [4 + rng.uniform(0, 1) for _ in KEYS]}
    return {"rouge_l_per_seed": [rng.uniform(5, 15) for _ in seeds], "exact_match": 0.0, "prompt_keys": KEYS,
            "per_prompt": per_prompt}


def write_synthetic_results(root: Path, seeds_by_prefix: dict[str, list[int]]) -> Path:
    """``root/quality/cpu``: the teacher on test seeds 10 and 20, and each ``prefix`` on its seeds."""
    rng = random.Random(7)
    size_dir = root / "quality" / "cpu"
    for seed in (10, 20):
        _write(size_dir / "teacher" / f"test-seed{seed}.json", {"test": _test(rng, 0.0, [seed])},
               f"teacher/test-seed{seed}")
    offsets = {"sft": 2.0, "kd": 1.8, "minillm": 1.5, "minillm-alpha0": 1.7, "sft-init": 2.1,
               "minillm-decomposed": 1.5, "minillm-no-single-step": 1.6}
    for prefix, seeds in seeds_by_prefix.items():
        for seed in seeds:
            curves = {"minillm": {CURVE_PANELS[1][1]: [[step, 2.0 - 0.1 * step] for step in range(5)]}}
            _write(size_dir / prefix / f"seed{seed}.json",
                   {"test": _test(rng, offsets[prefix], [10, 20]),
                    "tested_checkpoint": "sft_best_loss" if prefix == "sft-init" else "best",
                    "training": {"best": {"validation_rouge_l": 10.0 + seed, "step": 4 * seed}, "curves": curves}},
                   f"{prefix}/seed{seed}")
    return size_dir


def _report(results: Path, out: Path) -> str:
    assert bench_report.main(["--results", str(results), "--out", str(out)]) == 0
    return out.read_text()


def _cell(text: str, section: str, metric: str, column: str) -> str:
    """The cell of ``metric``'s row under ``column`` in the first table after ``section``."""
    lines = text[text.index(section):].splitlines()
    header = next(line for line in lines if line.startswith("| metric"))
    row = next(line for line in lines if line.startswith(f"| {metric} |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    return [cell.strip() for cell in row.strip("|").split("|")][columns.index(column)]


def test_tables_are_a_function_of_the_result_files_alone(tmp_path):
    results = tmp_path / "results"
    size_dir = write_synthetic_results(results, {"sft": [1, 2], "kd": [1], "minillm": [1, 2, 3],
                                                 "minillm-alpha0": [2], "sft-init": [1, 2, 3],
                                                 "minillm-decomposed": [1, 3], "minillm-no-single-step": [2, 3]})
    first = _report(results, tmp_path / "a" / "results.md")
    second = _report(results, tmp_path / "b" / "results.md")
    assert first == second  # same files -> byte-identical tables and plots
    for name in ("bench-quality-cpu-main.png", "bench-quality-cpu-main-curves.png", "bench-quality-cpu-ablations.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Every row says how many training seeds it holds, and which.
    assert "| SFT (2 seeds) | 2 (1, 2) |" in first and "| KD (1 seed) | 1 (1) |" in first
    assert "| MiniLLM (3 seeds) | 3 (1, 2, 3) |" in first
    # MiniLLM's start, the SFT init, is a reference row of both tables (its best.json is not its checkpoint's).
    assert first.count("| SFT init (3 seeds) | 3 (1, 2, 3) |") == 2
    assert re.search(r"\| SFT init \(3 seeds\) \| 3 \(1, 2, 3\) \| [^|]+ \| [^|]+ \| 3 × 2 \|  \|  \|", first)
    assert "MiniLLM w/o teacher-mixed sampling (1 seed)" in first.split("ablations table")[1]
    assert "KD (" not in first.split("ablations table")[1]  # the main table's methods only there

    # A changed per-prompt value changes the right cells: MiniLLM's reverse KL and its difference to SFT.
    path = size_dir / "minillm" / "seed2.json"
    record = json.loads(path.read_text())
    record["test"]["per_prompt"]["reverse_kl"][3] += 6.0
    path.write_text(json.dumps(record))
    changed = _report(results, tmp_path / "a" / "results.md")
    main, kl = "main table", "reverse KL(q‖p) / token, own answers"
    for metric, column in ((kl, "SFT (2 seeds)"), ("teacher NLL / token of answers", "MiniLLM (3 seeds)")):
        assert _cell(changed, main, metric, column) == _cell(first, main, metric, column)
    assert _cell(changed, main, kl, "MiniLLM (3 seeds)") != _cell(first, main, kl, "MiniLLM (3 seeds)")
    # ... to what the project's statistics give for the seeds averaged prompt by prompt.
    runs = [json.loads((size_dir / "minillm" / f"seed{s}.json").read_text())["test"]["per_prompt"]["reverse_kl"]
            for s in (1, 2, 3)]
    merged = [sum(values) / 3 for values in zip(*runs)]
    assert _cell(changed, main, kl, "MiniLLM (3 seeds)") == interval_cell(bootstrap_mean(merged).to_dict())
    sft = [json.loads((size_dir / "sft" / f"seed{s}.json").read_text())["test"]["per_prompt"]["reverse_kl"]
           for s in (1, 2)]
    sft_merged = [sum(values) / 2 for values in zip(*sft)]
    difference = _cell(changed, "Paired differences against SFT", kl, "MiniLLM (3 seeds) − SFT (2 seeds)")
    assert difference == interval_cell(paired_difference(merged, sft_merged).to_dict())
    assert (tmp_path / "a" / "bench-quality-cpu-main.png").read_bytes() != \
        (tmp_path / "b" / "bench-quality-cpu-main.png").read_bytes()
    # A row with fewer seeds than the baseline is also compared with the baseline's runs of its seeds only.
    alpha0 = json.loads((size_dir / "minillm-alpha0" / "seed2.json").read_text())["test"]["per_prompt"]["reverse_kl"]
    same = _cell(changed, "Paired differences against MiniLLM (seed 2): the same training seeds", kl,
                 "MiniLLM w/o teacher-mixed sampling (1 seed) − MiniLLM (seed 2)")
    assert same == interval_cell(paired_difference(alpha0, runs[1]).to_dict())
    assert "Paired differences against SFT (seed 1): the same training seeds" in changed.split("ablations table")[0]
    assert "against MiniLLM (seeds 1, 2, 3)" not in changed  # a row with every seed of the baseline: no extra table
    # The paper's single-step pair, paired directly on the seeds both hold.
    pair = [json.loads((size_dir / prefix / "seed3.json").read_text())["test"]["per_prompt"]["reverse_kl"]
            for prefix in ("minillm-decomposed", "minillm-no-single-step")]
    assert _cell(changed, "the paper's single-step comparison, on training seed 3", kl,
                 "MiniLLM, r_t only in the single-step term (decomposed) (seed 3) − "
                 "MiniLLM, r_t in the reward-to-go, w/o single-step term (seed 3)") == \
        interval_cell(paired_difference(*pair).to_dict())
    # MiniLLM variants of one seed that started from different SFT-init weights are pointed out.
    assert "different SFT-init weights" not in changed
    for prefix, digest in (("minillm", "aa"), ("minillm-alpha0", "bb")):
        path = size_dir / prefix / "seed2.json"
        record = json.loads(path.read_text())
        record["init"] = {"unit": "sft-init/seed2", "weights": {"model.safetensors": {"sha256": digest}}}
        path.write_text(json.dumps(record))
    mixed = _report(results, tmp_path / "a" / "results.md")
    assert "**Note:** the MiniLLM rows of training seed(s) 2 started from different SFT-init weights" in \
        mixed.split("ablations table")[1]


@pytest.mark.parametrize("damage", ["truncated", "misplaced"])
def test_a_bad_result_file_is_one_error_line_and_nothing_written(tmp_path, capsys, damage):
    results = tmp_path / "results"
    size_dir = write_synthetic_results(results, {"sft": [1], "minillm": [1]})
    bad = size_dir / "minillm" / "seed1.json"
    if damage == "truncated":
        bad.write_text(bad.read_text()[:100])
    else:  # another unit's file under this name
        bad.write_text((size_dir / "sft" / "seed1.json").read_text())
    out = tmp_path / "docs" / "results.md"
    assert bench_report.main(["--results", str(results), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(bad) in error
    assert ("corrupt result file" if damage == "truncated" else "expected 'minillm/seed1'") in error
    assert not (tmp_path / "docs").exists()


def _unit(tmp_path: Path, name: str, kind: str, estimate: float, calls: list, clock: list, minutes: float = 1.0,
          needs: tuple[str, ...] = ()) -> units.Unit:
    def work():
        calls.append(name)
        clock[0] += 60 * minutes
        return {"value": name}
    return units.Unit(name, kind, tmp_path / f"{name}.json", work, estimate, needs)


def test_budget_starts_no_unit_whose_measured_cost_exceeds_what_is_left(tmp_path):
    clock, calls, lines = [0.0], [], []
    _write(tmp_path / "train-a.json", {}, "train-a", kind="train", wall_seconds=600)  # measured: 10 min
    plan = [_unit(tmp_path, "train-a", "train", 1, calls, clock),
            _unit(tmp_path, "train-b", "train", 1, calls, clock),  # measured 10 min > 8 left: not started
            _unit(tmp_path, "eval-a", "eval", 3, calls, clock, minutes=5),  # estimated 3 min: started, took 5
            _unit(tmp_path, "eval-b", "eval", 3, calls, clock),  # now measured 5 min > 8 - 5 left: not started
            _unit(tmp_path, "after-b", "other", 0.5, calls, clock, needs=("train-b",))]
    summary = units.run_units(plan, budget_minutes=8, clock=lambda: clock[0], log=lines.append)
    assert calls == ["eval-a"]
    assert summary.already == ["train-a"] and summary.done == ["eval-a"]
    assert summary.skipped_for_budget == ["train-b", "eval-b"] and summary.blocked == ["after-b"]
    assert not (tmp_path / "train-b.json").exists() and not (tmp_path / "eval-b.json").exists()
    assert any("train-b: skipped for budget (measured 10.0 min > 8.0 min left)" in line for line in lines)
    assert any("eval-b: skipped for budget (measured 5.0 min > 3.0 min left)" in line for line in lines)
    assert lines[-1] == "units: 1 done now, 1 already done, 2 skipped for budget, 1 blocked by those, 3 remaining"
    written = units.read_result(tmp_path / "eval-a.json")
    assert written["value"] == "eval-a" and written["provenance"]["wall_seconds"] == 300.0
    assert written["provenance"]["machine"]["cpu_cores"] >= 1 and len(written["provenance"]["commit"]) == 40
    # Without a budget everything left runs, in order; a dry run starts nothing but says what would.
    dry = units.run_units(plan, dry_run=True, clock=lambda: clock[0], log=lines.append)
    assert dry.planned == ["train-b", "eval-b", "after-b"] and calls == ["eval-a"]
    units.run_units(plan, clock=lambda: clock[0], log=lines.append)
    assert calls == ["eval-a", "train-b", "eval-b", "after-b"]


def test_a_result_of_other_settings_is_refused_not_reused(tmp_path):
    clock, calls = [0.0], []
    plan = [_unit(tmp_path, "a", "k", 1, calls, clock), _unit(tmp_path, "b", "k", 1, calls, clock)]
    for unit in plan:
        unit.settings = {"epochs": 3, "sets": ["sampling.alpha=0.2"]}
    units.run_units(plan[:1], clock=lambda: clock[0], log=lambda line: None)
    assert units.read_result(tmp_path / "a.json")["settings"] == {"epochs": 3, "sets": ["sampling.alpha=0.2"]}
    units.run_units(plan[:1], clock=lambda: clock[0], log=lambda line: None)  # same settings: reused
    assert calls == ["a"]
    plan[0].settings = {"epochs": 3, "sets": ["sampling.alpha=0.5"]}
    with pytest.raises(ValueError, match=r"a\.json: made with sets=\['sampling.alpha=0.2'\], this plan has "
                                         r"\['sampling.alpha=0.5'\]"):
        units.run_units(plan, clock=lambda: clock[0], log=lambda line: None)
    assert calls == ["a"]  # b did not start either
    plan[0].settings = {"epochs": 3, "sets": ["sampling.alpha=0.2"], "recipe": {"data": {"max_length": 160}}}
    with pytest.raises(ValueError, match=r"made with recipe=None, this plan has \{'data'"):
        units.run_units(plan[:1], clock=lambda: clock[0], log=lambda line: None)
    units.write_result(plan[0], {}, 1.0, datetime.now(timezone.utc), units.git_state())
    plan[0].settings["recipe"]["data"]["max_length"] = 192  # a nested difference is named by its path
    with pytest.raises(ValueError, match=r"made with recipe\.data\.max_length=160, this plan has 192"):
        units.run_units(plan[:1], clock=lambda: clock[0], log=lambda line: None)


def test_a_failing_unit_stops_the_run_and_keeps_what_landed_before_it(tmp_path):
    clock, calls, lines = [0.0], [], []
    plan = [_unit(tmp_path, "a", "k", 1, calls, clock), _unit(tmp_path, "b", "k", 1, calls, clock),
            _unit(tmp_path, "c", "k", 1, calls, clock)]

    def fail():
        raise SystemExit("training failed")
    plan[1].work = fail
    with pytest.raises(SystemExit, match="training failed"):
        units.run_units(plan, clock=lambda: clock[0], log=lines.append)
    assert calls == ["a"] and (tmp_path / "a.json").is_file() and not (tmp_path / "b.json").exists()
    assert lines[-2:] == ["[2/3] b: stopped after 0.0 min; no result written",
                          "units: 1 done now, 0 already done, 0 skipped for budget, 0 blocked by those, 2 remaining"]


def test_a_replaced_result_file_does_not_make_the_next_unit_dirty_but_a_code_change_does(tmp_path, monkeypatch):
    """A re-run unit replaces a committed result file; the next unit starts before it is committed,
    and must still record the code as clean (minillm-alpha0/seed1.json says "+dirty" for this alone)."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "a.json").write_text("{}")
    (tmp_path / "bench" / "units.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    monkeypatch.setattr(units, "REPO", tmp_path)
    monkeypatch.setattr(units, "RESULTS", tmp_path / "bench" / "results")
    (tmp_path / "bench" / "results" / "a.json").write_text('{"replaced": true}')
    (tmp_path / "bench" / "results" / "b.json").write_text("{}")
    state = units.git_state()
    assert state["dirty"] is False and state["diff_sha256"] is None and len(state["commit"]) == 40
    (tmp_path / "bench" / "units.py").write_text("x = 2\n")
    state = units.git_state()
    assert state["dirty"] is True and len(state["diff_sha256"]) == 64


def test_a_corrupt_result_file_stops_the_run_before_any_work(tmp_path):
    clock, calls = [0.0], []
    plan = [_unit(tmp_path, "a", "k", 1, calls, clock), _unit(tmp_path, "b", "k", 1, calls, clock)]
    (tmp_path / "b.json").write_text('{"format": "minillm-rl bench unit", "version": 1')
    with pytest.raises(ValueError, match=r"b\.json: corrupt result file") as error:
        units.run_units(plan, clock=lambda: clock[0], log=lambda line: None)
    assert calls == [] and "\n" not in str(error.value)
    assert units.read_result(tmp_path / "missing.json") is None  # missing: the unit is pending


def test_plan_of_units_runs_seed_by_seed_and_retrains_an_init_whose_checkpoint_is_gone(tmp_path):
    from minillm_rl.config import load_config

    base = load_config(str(bench_quality.RECIPE), ["model.teacher=t", "model.student=s", "data.train=d"])
    runs = bench_quality.plan_runs(tmp_path / "work", base, 1000, seeds=[1, 2], epochs=3, sft_epochs=2, table="main")
    args = argparse.Namespace(results=tmp_path / "results", size="cpu", student=str(tmp_path), teacher="/c/teacher",
                              out=tmp_path / "work", data="sharegpt", num_examples=800, num_test=64, epochs=3,
                              sft_epochs=2, pt_corpus=str(tmp_path / "pt_corpus"))
    evaluate = argparse.Namespace(seeds=(10, 20))
    sets = ["runtime.worker_threads=1", "sampling.alpha=0.5", "eval.max_new_tokens=32"]
    settings = quality_units.plan_settings(args, "cpu", sets, evaluate.seeds, None)
    plan = quality_units.build_units(args, bench_quality.SIZES["cpu"], runs, lambda run: [], evaluate, tmp_path,
                                     settings)
    names = [unit.name for unit in plan]
    assert names == ["teacher/test-seed10", "teacher/test-seed20", "sft/seed1", "kd/seed1", "seqkd/seed1",
                     "sft-init/seed1", "minillm/seed1", "sft/seed2", "kd/seed2", "seqkd/seed2", "sft-init/seed2",
                     "minillm/seed2"]
    by_name = {unit.name: unit for unit in plan}
    # Each result records what it depends on, without the machine's paths.
    steps = runs[-1].overrides[2]
    assert steps.startswith("train.total_steps=")
    assert by_name["minillm/seed2"].settings["overrides"] == ["train.phases=[minillm]", steps, "train.seed=2"]
    assert by_name["minillm/seed2"].settings["sets"] == ["sampling.alpha=0.5", "eval.max_new_tokens=32"]
    assert by_name["minillm/seed2"].settings["recipe"]["sampling"]["alpha"] == base.sampling.alpha
    assert str(tmp_path) not in json.dumps(by_name["minillm/seed2"].settings)
    teacher = by_name["teacher/test-seed20"].settings  # what the teacher's test depends on, only
    assert teacher["test_seed"] == 20 and teacher["sets"] == ["eval.max_new_tokens=32"]
    assert set(teacher["recipe"]) == {"data", "eval"} and teacher["teacher"] == "teacher"
    assert by_name["minillm/seed1"].needs == ("teacher/test-seed10", "teacher/test-seed20", "sft-init/seed1")
    assert by_name["minillm/seed1"].kind == by_name["minillm/seed2"].kind == "quality-cpu/minillm"
    init = by_name["sft-init/seed1"]
    assert init.is_pending()
    _write(init.result_path, {}, "sft-init/seed1")
    assert init.is_pending()  # its checkpoint is gone and minillm/seed1 still needs it
    (tmp_path / "work" / "runs" / "sft-init-seed1" / "sft_best_loss").mkdir(parents=True)
    assert not init.is_pending()
    (tmp_path / "work" / "runs" / "sft-init-seed1" / "sft_best_loss").rmdir()
    _write(by_name["minillm/seed1"].result_path, {}, "minillm/seed1")
    assert not init.is_pending()  # nothing needs it any more


def test_train_starts_fresh_replaces_an_attempt_without_checkpoint_and_resumes_one_with(tmp_path, monkeypatch):
    run = argparse.Namespace(run_dir=tmp_path / "run")
    calls, exits = [], []

    def fake_cli(*args, log):
        calls.append(args[args.index("--resume"):])
        code = exits.pop(0)
        run.run_dir.mkdir(exist_ok=True)
        if code == 3:  # preempted after a checkpoint
            (run.run_dir / "checkpoints").mkdir(exist_ok=True)
            (run.run_dir / "checkpoints" / "latest").write_text("step1")
        elif code == 0:
            (run.run_dir / "run_summary.json").write_text("{}")
        return code

    monkeypatch.setattr(quality_units, "_cli", fake_cli)
    exits[:] = [3, 0]
    quality_units.train(run, [], tmp_path / "log")
    assert calls == [("--resume", "none"), ("--resume", "auto")]  # fresh, then resumed until done
    for path in (run.run_dir / "run_summary.json", run.run_dir / "checkpoints" / "latest"):
        path.unlink()
    (run.run_dir / "config.yaml").write_text("{}")  # an attempt stopped before its first checkpoint
    calls.clear()
    exits[:] = [0]
    quality_units.train(run, [], tmp_path / "log")
    assert calls == [("--resume", "none", "--overwrite")]
    (run.run_dir / "run_summary.json").unlink()
    exits[:] = [1]
    with pytest.raises(SystemExit, match=r"training .*run failed \(exit 1\); see .*log"):
        quality_units.train(run, [], tmp_path / "log")


def test_a_second_bench_quality_on_the_same_out_stops_in_one_line(tmp_path, capsys):
    with quality_units.exclusive(tmp_path / "out"):
        with pytest.raises(SystemExit) as stopped:
            with quality_units.exclusive(tmp_path / "out"):
                raise AssertionError("entered a held lock")
        assert stopped.value.code == 2
        assert "another bench-quality is running in" in capsys.readouterr().err
    with quality_units.exclusive(tmp_path / "out"):  # released on leaving
        pass


def _student_manifest(sha: str, nll_after: float) -> dict:
    return {"dtype": "float32", "layers_kept": [0, 1, 5], "num_layers": 3, "version": 1,
            "teacher": {"architecture": "LlamaForCausalLM", "num_layers": 6, "source": "/a/machine/path"},
            "layer_selection": {"rule": "influence", "influence": [0.9, 0.2, 0.01, 0.02, 0.03, 0.4],
                                "measured_on": {"fingerprint": "f", "held_out_blocks": 4}},
            "healing": {"settings": {"tokens": 64, "lr": 3e-4}, "corpus": {"fingerprint": "c"}, "tokens_budget": 64,
                        "held_out_nll": {"student_after": nll_after, "teacher": 2.5}, "train_seconds": 10.0},
            "weights": {"model.safetensors": {"sha256": sha, "bytes": 8}}}


def test_a_rebuilt_student_is_the_same_when_its_recipe_and_held_out_nll_agree(tmp_path):
    """The same recipe on another CPU gives other weights and an NLL ~1e-5 away: its results are
    comparable. A student healed differently (another NLL) or of another recipe is not."""
    here, there = _student_manifest("aa" * 32, 3.465532), _student_manifest("bb" * 32, 3.465521)
    args = argparse.Namespace(student="/cache/student-20l", teacher="/c/teacher", data="sharegpt", num_examples=8,
                              num_test=4, epochs=1, sft_epochs=1, pt_corpus=None)
    settings = [quality_units.plan_settings(args, "cpu", [], (10,), manifest) for manifest in (here, there)]
    assert settings[0] == settings[1]
    assert "aa" * 32 not in json.dumps(settings[0]) and "/a/machine/path" not in json.dumps(settings[0])
    other_layers = {**there, "layers_kept": [0, 1, 4]}
    assert quality_units.plan_settings(args, "cpu", [], (10,), other_layers)["student"] != settings[0]["student"]
    result = _write(tmp_path / "sft" / "seed1.json", {"student": here, "settings": settings[0]}, "sft/seed1")
    teacher = _write(tmp_path / "teacher" / "test-seed10.json", {"test": {}}, "teacher/test-seed10")
    quality_units.check_student_builds([teacher, result], there)  # within rounding: accepted
    healed_otherwise = _student_manifest("cc" * 32, 3.4712)
    with pytest.raises(ValueError, match=r"sft/seed1\.json: made with a student whose held-out NLL after healing "
                                         r"was 3\.465532, this one's is 3\.471200") as error:
        quality_units.check_student_builds([teacher, result], healed_otherwise)
    assert "\n" not in str(error.value)
    # The report names each build a table's rows used.
    assert bench_report.provenance([result]).endswith(f"student builds: {'aa' * 6} (held-out NLL 3.465532).")
