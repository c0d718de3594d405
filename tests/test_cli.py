"""The real ``minillm-rl`` CLI on tiny checkpoints written by the test (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_assets import word_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "say", "hello", "world", "the", "answer", "is"]


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minillm_rl.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_lm_factory):
    tokenizer = word_tokenizer(WORDS)
    vocab = tokenizer.get_vocab()
    out = tmp_path_factory.mktemp("teacher")
    tiny_lm_factory("llama", len(vocab), num_layers=4, init_std=0.3).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_lm_factory():
    from conftest import make_tiny_lm
    return make_tiny_lm


def test_init_student_keeps_evenly_spaced_layers(teacher_dir, tmp_path):
    result = _run("init-student", "--teacher", str(teacher_dir), "--layers", "2", "--select", "even",
                  "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "s" / "student_manifest.json").read_text())["layers_kept"] == [0, 3]
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert (tmp_path / "s" / "tokenizer.json").is_file()


def test_init_student_in_bfloat16(teacher_dir, tmp_path):
    result = _run("init-student", "--teacher", str(teacher_dir), "--keep-layers", "1,2", "--dtype", "bfloat16",
                  "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file
    weights = load_file(tmp_path / "s" / "model.safetensors")
    assert {str(tensor.dtype) for tensor in weights.values()} == {"torch.bfloat16"}


def _dolly_file(tmp_path):
    data = tmp_path / "dolly.jsonl"
    records = [{"instruction": "say hello", "context": "", "response": "hello world"},
               {"instruction": "the answer is", "context": "alpha beta", "response": "gamma delta"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eval_writes_results_that_match_its_answers(teacher_dir, tmp_path, dtype):
    out = tmp_path / "eval"
    result = _run("eval", "--model", str(teacher_dir), "--data", str(_dolly_file(tmp_path)), "--out", str(out),
                  "--max-new-tokens", "4", "--seeds", "1", "2", "--max-prompt-tokens", "64", "--dtype", dtype)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["model"] == {"source": str(teacher_dir), "gguf_file": None, "dtype": dtype,
                                            "device": "cuda" if torch.cuda.is_available() else "cpu"}
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert results["num_examples"] == 2 and len(answers) == 2
    assert results["rouge_l_per_seed"] and len(results["rouge_l_per_seed"]) == 2
    from minillm_rl.evaluation.metrics import rouge_l
    assert abs(rouge_l([a["prediction"] for a in answers], [a["references"] for a in answers])
               - results["rouge_l_per_seed"][0]) < 1e-9
    assert "| model |" in (out / "results.md").read_text()


@pytest.mark.parametrize("args, expected", [
    (["eval", "--model", "/nonexistent/model", "--data", "x.jsonl", "--out", "OUT"], "/nonexistent/model"),
    (["init-student", "--teacher", "/nonexistent/t", "--layers", "2", "--out", "OUT"], "/nonexistent/t"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, expected, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = _run(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minillm-rl: error:") and expected in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_eval_of_a_gguf_file(tmp_path, smollm2_gguf):
    gguf_path = smollm2_gguf
    data = tmp_path / "capital.jsonl"
    data.write_text(json.dumps({"instruction": "What is the capital of France? One word.", "response": "Paris"}) + "\n")
    out = tmp_path / "eval"
    result = _run("eval", "--model", str(gguf_path.parent), "--gguf-file", gguf_path.name, "--data", str(data),
                  "--out", str(out), "--template", "chat", "--max-new-tokens", "8", "--seeds", "1", "2", "3",
                  "--temperature", "0.1")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["model"]["gguf_file"] == gguf_path.name
    # The dequantised instruct teacher answers (near-greedy): "Paris" is in every sampled answer.
    assert "Paris" in json.loads((out / "answers.jsonl").read_text().splitlines()[0])["prediction"]
    assert min(results["rouge_l_per_seed"]) > 20


def test_eval_on_a_gpu_that_is_not_there_is_one_line(teacher_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    result = _run("eval", "--model", str(teacher_dir), "--data", str(_dolly_file(tmp_path)), "--out",
                  str(tmp_path / "out"), "--device", "cuda")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["minillm-rl: error: device 'cuda': 0 CUDA device(s) visible"]
    assert not (tmp_path / "out").exists()


def test_eval_of_a_malformed_data_file_names_file_and_line(teacher_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": \n')
    result = _run("eval", "--model", str(teacher_dir), "--data", str(data), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{data}:2" in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------- eval --teacher (distillation metrics) and report's paired differences

@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_lm_factory):
    tokenizer = word_tokenizer(WORDS)
    out = tmp_path_factory.mktemp("student")
    tiny_lm_factory("llama", len(tokenizer), num_layers=2, seed=1, init_std=0.3).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _prompts_file(tmp_path):
    data = tmp_path / "prompts.jsonl"
    records = [{"instruction": f"say {a} {b}", "context": "", "response": f"{b} {a} world"}
               for a, b in [("alpha", "beta"), ("gamma", "delta"), ("hello", "world"), ("the", "answer"),
                            ("is", "alpha"), ("beta", "gamma")]]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


def _eval_with_teacher(model, teacher, data, out) -> subprocess.CompletedProcess:
    return _run("eval", "--model", str(model), "--teacher", str(teacher), "--data", str(data), "--out", str(out),
                "--max-new-tokens", "6", "--seeds", "1", "2", "--max-prompt-tokens", "64",
                "--bootstrap-resamples", "200")


def test_eval_with_a_teacher_writes_the_metrics_and_report_pairs_two_evals(teacher_dir, student_dir, tmp_path):
    from minillm_rl.evaluation.protocol import METRICS

    data = _prompts_file(tmp_path)
    student_out, teacher_out = tmp_path / "student-eval", tmp_path / "teacher-eval"
    result = _eval_with_teacher(student_dir, teacher_dir, data, student_out)
    assert result.returncode == 0, result.stderr
    assert "| reverse KL(q‖p) / token, own answers |" in result.stdout
    results = json.loads((student_out / "results.json").read_text())
    assert results["settings"]["teacher"] == {"source": str(teacher_dir), "gguf_file": None}
    assert results["settings"]["bootstrap"] == {"resamples": 200, "confidence": 0.95, "seed": 0}
    assert list(results["metrics"]) == list(METRICS) and len(results["prompt_keys"]) == 6
    assert all(len(values) == 6 for values in results["per_prompt"].values())
    answers = [json.loads(line) for line in (student_out / "answers.jsonl").read_text().splitlines()]
    for index, answer in enumerate(answers):
        assert [s["seed"] for s in answer["samples"]] == [1, 2] and answer["teacher_answer"] == \
            answer["samples"][0]["teacher_answer"]
        per_answer = [s["metrics"]["reverse_kl"] for s in answer["samples"]]
        assert min(per_answer) > 0 and results["per_prompt"]["reverse_kl"][index] == pytest.approx(sum(per_answer) / 2)
    assert "reverse KL(q‖p)" in (student_out / "results.md").read_text()

    # The teacher judged by itself: the same seeds draw the same answers, the KL is 0 and both NLLs agree.
    result = _eval_with_teacher(teacher_dir, teacher_dir, data, teacher_out)
    assert result.returncode == 0, result.stderr
    for line in (teacher_out / "answers.jsonl").read_text().splitlines():
        for sample in json.loads(line)["samples"]:
            assert sample["prediction"] == sample["teacher_answer"] and sample["metrics"]["reverse_kl"] == 0.0
            assert sample["metrics"]["teacher_nll"] == pytest.approx(sample["metrics"]["student_nll_teacher"], abs=1e-6)

    report = _run("report", f"teacher={teacher_out}", f"student={student_out}", "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "| metric | student − teacher |" in report.stdout
    kl_row = next(line for line in report.stdout.splitlines() if line.startswith("| reverse KL") and "[" in line
                  and line.count("|") == 3)
    mean = float(kl_row.split("|")[2].split("[")[0])
    assert mean == pytest.approx(results["metrics"]["reverse_kl"]["mean"], abs=0.006)  # the teacher's KL is 0


def test_a_teacher_with_another_tokenizer_is_one_line(student_dir, tmp_path, tiny_lm_factory):
    other = tmp_path / "other-teacher"
    tokenizer = word_tokenizer(["other", "words"])
    tiny_lm_factory("llama", len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    result = _eval_with_teacher(student_dir, other, _prompts_file(tmp_path), tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"minillm-rl: error: --teacher {other}: tokenizers differ")
    assert not (tmp_path / "out").exists()


def test_progress_bars_of_libraries_imported_first_are_quiet_off_a_terminal(tmp_path):
    """A bench script imports ``datasets`` before it parses its arguments; the libraries read their
    environment variables at import, so setting them then is not enough: the log must still get no
    carriage-return frames (with stderr not a terminal, as in a log file)."""
    script = ("import datasets\n"
              "from minillm_rl.cli import quiet_progress_bars_off_a_terminal\n"
              "quiet_progress_bars_off_a_terminal()\n"
              f"datasets.Dataset.from_dict({{'a': [1, 2, 3]}}).save_to_disk({str(tmp_path / 'data')!r})\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith(("PROGRESS_BARS", "TQDM_DISABLE"))}
    # Bytes, not text=True: its universal newlines would turn every '\r' into '\n'.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert (tmp_path / "data" / "dataset_info.json").is_file()
    assert b"\r" not in result.stdout + result.stderr
