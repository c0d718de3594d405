"""The real ``minillm-rl`` CLI on tiny checkpoints written by the test (no network)."""

from __future__ import annotations

import json
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
    result = _run("init-student", "--teacher", str(teacher_dir), "--layers", "2", "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert (tmp_path / "s" / "tokenizer.json").is_file()


def test_init_student_in_bfloat16(teacher_dir, tmp_path):
    result = _run("init-student", "--teacher", str(teacher_dir), "--layers", "2", "--dtype", "bfloat16",
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
    (["demo", "--set", "sft_stepz=3", "--out", "OUT"], "sft_stepz"),
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
