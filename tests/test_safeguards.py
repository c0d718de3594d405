"""No silent traps (issue 27): the eval template comes from the model's record, occupied output
directories are refused, dropped examples are counted and a split that lost too many is refused,
every --help shows its defaults, and --print-config starts nothing. Each refusal is one line,
exit 2, with nothing written."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import yaml
from tiny_assets import TEMPLATE_WORDS, WORDS, word_tokenizer

from minillm_rl.cli import build_parser, main
from minillm_rl.config import load_config
from minillm_rl.data.prompt_record import PROMPT_RECORD, resolve_eval_template, write_prompt_record
from minillm_rl.runtime.inputs import (
    DataReport,
    check_dropped_shares,
    clear_previous_run,
    load_instruction_splits,
    load_test_examples,
)

RECIPE = """\
model:
  student: no/such/student
  teacher: no/such/teacher
data:
  train: no/such/data.jsonl
  template: chat
output:
  dir: {out}
"""


def _recipe(tmp_path, out) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(out=out), encoding="utf-8")
    return str(path)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("minillm-rl: error: "), err
    return err


# --- eval: the template the model was trained with -------------------------------------------------------------

def test_recorded_template_is_used_and_a_contradicting_one_refused_unless_forced(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    assert resolve_eval_template(str(model), None, False)[0] == "minillm"  # nothing recorded: the default
    assert resolve_eval_template(str(model), "chat", False)[0] == "chat"
    write_prompt_record(model, "chat", 96)
    assert json.loads((model / PROMPT_RECORD).read_text())["template"] == "chat"
    template, line = resolve_eval_template(str(model), None, False)
    assert template == "chat" and str(model / PROMPT_RECORD) in line
    assert resolve_eval_template(str(model), "chat", False)[0] == "chat"
    with pytest.raises(ValueError, match=r"--template minillm: .* was trained with template 'chat' .*--force-template"):
        resolve_eval_template(str(model), "minillm", False)
    assert resolve_eval_template(str(model), "minillm", True)[0] == "minillm"


def test_a_run_directory_without_the_record_answers_from_its_config(tmp_path):
    """best/ of a run written before the record existed: the run's config.yaml says the template."""
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  template: chat\n", encoding="utf-8")
    template, line = resolve_eval_template(str(run / "best"), None, False)
    assert template == "chat" and "config.yaml (data.template)" in line
    (tmp_path / "elsewhere").mkdir()  # a directory not named like a run's model: the config is not its
    (tmp_path / "config.yaml").write_text("data:\n  template: chat\n", encoding="utf-8")
    assert resolve_eval_template(str(tmp_path / "elsewhere"), None, False)[0] == "minillm"


def test_eval_cli_refuses_a_contradicting_template_before_loading_anything(tmp_path, capsys):
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    write_prompt_record(model, "chat", 96)  # no weights: the refusal comes before any load
    code = main(["eval", "--model", str(model), "--data", "x.jsonl", "--out", str(out), "--template", "minillm"])
    assert code == 2 and "trained with template 'chat'" in _error_line(capsys)
    assert not out.exists()


def test_eval_cli_refuses_a_non_empty_out_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text("{}", encoding="utf-8")  # e.g. a run's own test stage
    code = main(["eval", "--model", str(tmp_path / "no-model"), "--data", "x.jsonl", "--out", str(out)])
    assert code == 2 and f"--out {out}: not empty (it holds results.json)" in _error_line(capsys)
    assert (out / "results.json").read_text() == "{}"
    # With --overwrite the out check passes: the next failure is the missing model.
    code = main(["eval", "--model", str(tmp_path / "no-model"), "--data", "x.jsonl", "--out", str(out), "--overwrite"])
    assert code == 2 and "no-model" in _error_line(capsys)


# --- --help and --print-config -----------------------------------------------------------------------------------

def test_every_help_shows_every_default():
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in subparsers.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or action.default is None or action.default is False:
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._expand_help(action) if action.help else ""
            assert "default" in text, f"{name} {action.option_strings or action.dest}: --help hides its default"
    assert "(default: 256)" in subparsers.choices["eval"].format_help().replace("\n", " ").replace("  ", " ")


def test_print_config_prints_the_resolved_config_and_starts_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, out)
    assert main(["train", "--config", recipe, "--print-config", "sampling.alpha=0.3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(recipe, ["sampling.alpha=0.3"]).to_dict()
    assert printed["sampling"]["alpha"] == 0.3 and printed["data"]["max_dropped_share"] == 0.25
    assert not out.exists()


# --- train: an output.dir holding a previous run ------------------------------------------------------------------

def test_train_refuses_an_output_dir_holding_a_previous_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("previous run\n", encoding="utf-8")
    (out / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    recipe = _recipe(tmp_path, out)
    assert main(["train", "--config", recipe]) == 2
    line = _error_line(capsys)
    assert f"output.dir: {out} holds a previous run" in line and "--resume auto" in line and "--overwrite" in line
    assert main(["train", "--config", recipe, "--overwrite", "--resume", "auto"]) == 2
    assert "give one" in _error_line(capsys)
    # Resumed or overwritten, the directory is accepted: the next check (the missing student) fails instead.
    for flags in (["--resume", "auto"], ["--overwrite"]):
        assert main(["train", "--config", recipe, *flags]) == 2
        line = _error_line(capsys)
        assert "model.student: " in line and "no/such/student" in line
        assert line.endswith(f"(relative paths resolve against the current directory, {os.getcwd()})")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl"]  # nothing written or deleted
    assert (out / "config.yaml").read_text() == "previous run\n"


def test_overwrite_clears_a_previous_run_only(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "phase0-sft-step00000003").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text("{}")
    (run / "config.yaml").write_text("x")
    assert clear_previous_run(run) and list(run.iterdir()) == []
    other = tmp_path / "other"  # not a run directory: left alone
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert not clear_previous_run(other) and (other / "notes.txt").is_file()


# --- data: counted drops, and the share a validation or test split may lose ---------------------------------------

def _data_case(tmp_path, num_long: int):
    """40 records, ``num_long`` of them with a prompt over a 3-word instruction budget."""
    records = [{"instruction": ("alpha beta gamma delta " * 2 if i < num_long else "alpha") + f" q{i}",
                "response": "hello world"} for i in range(40)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tokenizer = word_tokenizer(WORDS + TEMPLATE_WORDS + [f"q{i}" for i in range(40)])
    budget = len(tokenizer("Below is an instruction that describes a task. Write a response that appropriately "
                           "completes the request.\n\n### Instruction:\nalpha q1\n\n### Response:\n")["input_ids"])
    overrides = [f"data.train={path}", "model.student=s", "model.teacher=t", "data.num_validation=10",
                 "eval.num_test=10", f"data.max_prompt_tokens={budget + 1}", f"data.max_length={budget + 9}",
                 "sampling.max_new_tokens=8", "eval.max_new_tokens=8"]
    return overrides, tokenizer


def _load(cfg, tokenizer) -> DataReport:
    report = DataReport()
    _, _, held_out = load_instruction_splits(cfg, tokenizer, report)
    load_test_examples(cfg, tokenizer, held_out, report)
    return report


def test_every_split_reports_loaded_kept_and_dropped(tmp_path):
    overrides, tokenizer = _data_case(tmp_path, num_long=4)
    cfg = load_config(None, overrides + ["data.max_dropped_share=1"])
    report = _load(cfg, tokenizer)
    splits = report.splits
    assert [splits[name].examples for name in ("train", "validation", "test")] == [20, 10, 10]
    assert sum(split.dropped_prompt_too_long for split in splits.values()) == 4
    assert all(split.kept == split.examples - split.dropped for split in splits.values())
    assert report.lines[0].startswith("loaded 40 examples from") and "10 held out for the test stage" in report.lines[0]
    assert report.lines[1:] == [splits[name].line(cfg.data.max_prompt_tokens)
                                for name in ("train", "validation", "test")]
    assert f"{splits['train'].dropped_prompt_too_long} prompts over {cfg.data.max_prompt_tokens} tokens dropped" \
        in report.lines[1]


def test_a_validation_or_test_split_that_lost_too_much_is_refused(tmp_path):
    overrides, tokenizer = _data_case(tmp_path, num_long=24)  # 60 % of the prompts are over the budget
    report = _load(load_config(None, overrides + ["data.max_dropped_share=1"]), tokenizer)
    worst = max(("validation", "test"), key=lambda name: report.splits[name].dropped)
    share = report.splits[worst].dropped / report.splits[worst].examples
    assert share > 0.25
    with pytest.raises(ValueError, match=r"^data\.max_dropped_share=0\.25: the (validation|test) split lost \d+ of "
                                         r"its 10 examples .* set data\.max_dropped_share=0\.\d\d to accept it$"):
        check_dropped_shares(load_config(None, overrides), report)
    check_dropped_shares(load_config(None, overrides + [f"data.max_dropped_share={share}"]), report)


def test_under_a_launcher_every_rank_refuses_an_occupied_output_dir_at_once(tmp_path):
    """Two ranks started as a launcher starts them (RANK, WORLD_SIZE, MASTER_PORT set, so the CLI's
    own checks are skipped): rank 0's refusal reaches rank 1 too, which reports it instead of going
    on alone (to fail on something else, or wait in the next collective until its timeout, 60 s
    here), and both exit 2 at once with nothing written."""
    import subprocess
    import sys
    import time

    from minillm_rl.runtime.learner import pick_free_port

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("previous run\n", encoding="utf-8")
    recipe = _recipe(tmp_path, out)
    base = {**os.environ, "DS_ACCELERATOR": "cpu", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(pick_free_port()), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, "-m", "minillm_rl.cli", "train", "--config", recipe,
                               "runtime.collective_timeout_s=60"],
                              env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [rank.communicate(timeout=120) for rank in ranks]
    assert time.monotonic() - started < 50
    for process, (_, stderr) in zip(ranks, results):
        assert process.returncode == 2, stderr[-2000:]
        assert f"output.dir: {out} holds a previous run" in stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
