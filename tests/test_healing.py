"""Prune + heal (``minillm_rl.healing``), the healing corpus and the student manifest, on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm
from safetensors.torch import load_file, save_file
from tiny_assets import WORDS, word_tokenizer

from minillm_rl.data import load_instructions, split_validation
from minillm_rl.data.healing_corpus import CorpusSource, build_heal_corpus, load_documents
from minillm_rl.healing import HealSettings, heal_student, healed_student, init_student
from minillm_rl.layer_selection import block_influence, most_influential_layers
from minillm_rl.models import check_model_files, evenly_spaced_layers, load_causal_lm, prune_student
from minillm_rl.student_manifest import MANIFEST_NAME, read_student_manifest

BLOCK = 16


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    """A 4-layer tiny Llama with peaked next-token distributions (its own samples: NLL ~1.3)."""
    return make_tiny_lm("llama", len(tokenizer), num_layers=4, init_std=1.0)


def _teacher_documents(teacher, tokenizer, count: int, seed: int = 0) -> list[str]:
    """``count`` texts sampled from ``teacher``: "alpha" then 14 sampled words, so each document
    plus its EOS is exactly one block of 16 and the teacher's NLL on a block is that of its own
    samples (low); a pruned copy starts far above it. Repeats are dropped."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((count, 1), tokenizer.convert_tokens_to_ids("alpha"))
    first_word = 3  # after <pad>, </s>, <unk>: words only, so decode -> encode gives the same ids
    with torch.no_grad():
        for _ in range(BLOCK - 2):
            probs = torch.softmax(teacher(input_ids=ids).logits[:, -1, first_word:], dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator) + first_word], dim=1)
    return list(dict.fromkeys(tokenizer.decode(row) for row in ids.tolist()))  # distinct: disjointness is checkable


def _write_corpus(directory, documents):
    directory.mkdir(parents=True, exist_ok=True)
    for index, document in enumerate(documents):
        (directory / f"doc{index:04d}.txt").write_text(document + "\n")
    return directory


def test_healing_lowers_held_out_nll_sees_exactly_the_budget_and_never_trains_on_held_out_blocks(teacher, tokenizer):
    settings = HealSettings(tokens=64 * 8 * BLOCK, block_size=BLOCK, batch_size=8, lr=3e-3, validation_blocks=8,
                            eval_every_tokens=16 * 8 * BLOCK)
    documents = _teacher_documents(teacher, tokenizer, 400)
    corpus = build_heal_corpus(documents, "teacher samples", tokenizer, BLOCK, settings.validation_blocks,
                               settings.budget_blocks * BLOCK, 8 * BLOCK, settings.seed)
    student = prune_student(teacher, evenly_spaced_layers(4, 2))
    trained_rows: list[torch.Tensor] = []
    student.register_forward_pre_hook(
        lambda module, args, kwargs: trained_rows.append(kwargs["input_ids"].clone()) if torch.is_grad_enabled()
        else None, with_kwargs=True)

    result = heal_student(student, teacher, corpus, settings, log=lambda line: None)

    nll = result["held_out_nll"]
    # The pruned student starts well above the teacher and healing closes most of the gap.
    assert nll["student_before"] > nll["teacher"] + 0.5
    assert nll["student_before"] - nll["student_after"] > 0.5 * (nll["student_before"] - nll["teacher"])
    assert nll["student_after"] == pytest.approx(result["curve"][-1]["nll"])
    assert [point["tokens"] for point in result["curve"]] == [2048, 4096, 6144, 8192]
    # Exactly the budget went through training forwards, and no held-out block was among them.
    trained = torch.cat(trained_rows)
    assert result["tokens_seen"] == settings.tokens == trained.numel()
    held_out = {tuple(row) for row in corpus.validation_blocks.tolist()}
    assert held_out and not held_out & {tuple(row) for row in trained.tolist()}
    # Held-out and training blocks come from different documents (each document is one block here).
    assert corpus.validation_documents == 8 and not held_out & {tuple(row) for row in corpus.train_blocks.tolist()}


def test_an_interrupted_healing_resumes_to_the_uninterrupted_result(teacher, tokenizer, tmp_path):
    settings = HealSettings(tokens=12 * 4 * BLOCK, block_size=BLOCK, batch_size=4, lr=3e-3, validation_blocks=4)
    corpus = build_heal_corpus(_teacher_documents(teacher, tokenizer, 80), "teacher samples", tokenizer, BLOCK, 4,
                               settings.budget_blocks * BLOCK, 4 * BLOCK, 0)
    keep = evenly_spaced_layers(4, 2)
    uninterrupted = prune_student(teacher, keep)
    expected = heal_student(uninterrupted, teacher, corpus, settings, log=lambda line: None)

    checkpoint = (tmp_path / "state.pt", {"run": "test"})
    calls = {"teacher": 0}

    def crash_in_the_eighth_step(module, args, kwargs):  # 1 held-out forward (4 blocks, batch 4), then one per step
        calls["teacher"] += 1
        if calls["teacher"] == 1 + 8:
            raise RuntimeError("simulated crash")

    hook = teacher.register_forward_pre_hook(crash_in_the_eighth_step, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            heal_student(prune_student(teacher, keep), teacher, corpus, settings, checkpoint, checkpoint_interval_s=0,
                         log=lambda line: None)
    finally:
        hook.remove()
    lines: list[str] = []
    resumed = prune_student(teacher, keep)
    result = heal_student(resumed, teacher, corpus, settings, checkpoint, log=lines.append)

    assert any("resuming" in line and "step 7/12" in line for line in lines)
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert result["held_out_nll"] == expected["held_out_nll"]
    with pytest.raises(ValueError, match="other settings"):
        heal_student(prune_student(teacher, keep), teacher, corpus, settings, (checkpoint[0], {"run": "other"}))


def _sharegpt_record(prompt: str, answer: str) -> dict:
    return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}


def test_an_instruction_corpus_leaves_out_the_reserved_examples_and_every_repeat_of_their_prompts(tmp_path, tokenizer):
    prompts = [f"question number {i}" for i in range(40)]
    records = [_sharegpt_record(p, f"answer {i}") for i, p in enumerate(prompts)]
    records += [_sharegpt_record("question  number 3\n", "a repeat of a reserved prompt, other spacing"),
                _sharegpt_record("question number 7", "another repeat"),
                _sharegpt_record("a new question", "kept")]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    reserved = 30
    # What an evaluation would hold out of the first `reserved` examples (bench_quality's way).
    examples = load_instructions(str(path)).examples
    _, test_examples = split_validation(examples[:reserved], 10, seed=1234)

    documents, description = load_documents(
        CorpusSource(instructions=str(path), template="minillm", reserved_examples=reserved), tokenizer)

    assert len(documents) == 10 + 1 and "minus 2 repeating" in description
    for example in examples[:reserved]:
        assert not any(f"\n{example.instruction}\n" in document for document in documents)
    assert any("a new question" in document for document in documents)
    assert all(f"\n{e.instruction}\n" not in d for e in test_examples for d in documents)


@pytest.fixture
def teacher_dir(tmp_path, teacher, tokenizer):
    out = tmp_path / "teacher"
    teacher.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_manifest_that_does_not_match_its_student_directory_is_refused(teacher_dir, tmp_path):
    student_dir = init_student(teacher_dir, 2, tmp_path / "student", select="even")
    manifest = read_student_manifest(student_dir)
    assert manifest["layers_kept"] == [0, 3] and manifest["healing"] is None
    assert manifest["layer_selection"] == {"rule": "even"}
    load_causal_lm(student_dir)  # matching: accepted

    weights = student_dir / "model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{MANIFEST_NAME} does not match .*model.safetensors differs"):
        load_causal_lm(student_dir)
    weights.write_bytes(original)
    check_model_files(student_dir)

    config_path = student_dir / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="config.json has 3 layers, the manifest 2"):
        check_model_files(student_dir)


def test_a_healed_student_is_built_once_and_reused(teacher_dir, teacher, tokenizer, tmp_path):
    corpus = CorpusSource(text=(str(_write_corpus(tmp_path / "corpus", _teacher_documents(teacher, tokenizer, 24))),))
    heal = HealSettings(tokens=2 * 4 * BLOCK, block_size=BLOCK, batch_size=4, validation_blocks=4)
    first = healed_student(teacher_dir, tmp_path / "artifacts", "tiny", 2, heal, corpus)
    built = first.stat().st_mtime_ns
    assert healed_student(teacher_dir, tmp_path / "artifacts", "tiny", 2, heal, corpus) == first
    assert first.stat().st_mtime_ns == built
    other = healed_student(teacher_dir, tmp_path / "artifacts", "tiny", 1, heal, corpus, select="even")
    assert other != first and read_student_manifest(other)["layers_kept"] == [0]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "minillm_rl.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_cli_heals_and_writes_the_manifest_and_training_refuses_a_student_it_no_longer_matches(
        teacher_dir, teacher, tokenizer, tmp_path):
    documents = _teacher_documents(teacher, tokenizer, 120)
    corpus = _write_corpus(tmp_path / "corpus", documents)
    out = tmp_path / "student"
    result = _cli("init-student", "--teacher", str(teacher_dir), "--layers", "2", "--out", str(out),
                  "--heal-tokens", str(20 * 4 * BLOCK), "--heal-corpus", str(corpus), "--heal-block-size", str(BLOCK),
                  "--heal-batch-size", "4", "--heal-lr", "3e-3", "--heal-validation-blocks", "8", "--threads", "1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    healing = manifest["healing"]
    influence = manifest["layer_selection"]["influence"]
    assert manifest["layer_selection"]["rule"] == "influence" and len(influence) == 4  # the default rule
    assert manifest["layers_kept"] == most_influential_layers(influence, 2)
    assert manifest["layer_selection"]["measured_on"]["held_out_blocks"] == 8
    assert manifest["teacher"]["source"] == str(teacher_dir)
    assert healing["tokens_seen"] == 20 * 4 * BLOCK and healing["corpus"]["documents"] == len(documents)
    assert healing["held_out_nll"]["student_after"] < healing["held_out_nll"]["student_before"]
    assert healing["corpus"]["validation_documents"] == 8 and len(healing["corpus"]["fingerprint"]) == 64
    assert set(manifest["weights"]) == {"model.safetensors"} and manifest["wall_seconds"] > 0
    assert not (tmp_path / "student.healing").exists()  # the checkpoint is gone once the student is saved

    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()),
                                                 "num_hidden_layers": 1}))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "response": w}) + "\n" for w in WORDS))
    run = _cli("train", "--config", "launch/recipes/tiny-e2e.yaml", f"model.teacher={teacher_dir}",
               f"model.student={out}", f"data.train={data}", f"output.dir={tmp_path / 'run'}",
               cwd=_repo_root())
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.student" in lines[0] and "config.json has 1 layers, the manifest 2" in lines[0]
    assert not (tmp_path / "run").exists()


def _repo_root():
    from pathlib import Path
    return Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra, expected", [
    (["--heal-tokens", "4096", "--heal-corpus", "MISSING"], "MISSING: not found"),
    (["--heal-tokens", "50", "--heal-corpus", "CORPUS"], "--heal-tokens 50: expected at least one batch of --heal-batch-size 4"),
    (["--heal-corpus", "CORPUS"], "need --heal-tokens"),
    (["--heal-tokens", "4096"], "healing needs a corpus"),
    ([], "--select influence measures the layers on the healing corpus's held-out text"),
    (["--keep-layers", "0,0"], "--keep-layers 0,0: expected distinct layer indices in [0, 3]"),
    (["--heal-tokens", "4096", "--heal-corpus", "CORPUS", "--heal-validation-blocks", "500"],
     "to hold out"),
])
def test_bad_healing_input_is_one_line_exit_2_and_writes_nothing(extra, expected, teacher_dir, tmp_path, capsys):
    """The CLI's entry function in this process (the subprocess path is the test above's)."""
    from minillm_rl.cli import main

    corpus = _write_corpus(tmp_path / "corpus", [" ".join(WORDS)] * 6)
    args = [str(corpus) if a == "CORPUS" else str(tmp_path / "missing") if a == "MISSING" else a for a in extra]
    expected = expected.replace("MISSING", str(tmp_path / "missing"))
    layers = [] if "--keep-layers" in args else ["--layers", "2"]
    code = main(["init-student", "--teacher", str(teacher_dir), *layers, "--out", str(tmp_path / "out"),
                 "--heal-block-size", str(BLOCK), "--heal-batch-size", "4", *args])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minillm-rl: error:") and expected in lines[0], lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.healing").exists()


def _plant_near_identity(model, layers: list[int]) -> None:
    """Make each of ``layers`` add almost nothing to the residual stream (its attention and MLP
    output projections scaled by 1e-4): the layers a pruning rule should drop first."""
    for index in layers:
        layer = model.model.layers[index]
        layer.self_attn.o_proj.weight.data.mul_(1e-4)
        layer.mlp.down_proj.weight.data.mul_(1e-4)


def test_influence_drops_exactly_the_planted_near_identity_layers(tokenizer, tmp_path):
    teacher = make_tiny_lm("llama", len(tokenizer), num_layers=6, init_std=1.0, seed=3)
    _plant_near_identity(teacher, [1, 2])
    blocks = torch.randint(3, len(tokenizer), (6, BLOCK), generator=torch.Generator().manual_seed(0))
    influence = block_influence(teacher, blocks, batch_size=4)
    assert len(influence) == 6
    assert max(influence[1], influence[2]) < 1e-3 < min(influence[i] for i in (0, 3, 4, 5))
    assert most_influential_layers(influence, 4) == [0, 3, 4, 5]
    # Evenly spaced keeps a planted layer: the rules differ on this teacher.
    assert 2 in evenly_spaced_layers(6, 4)

    # Through init-student: the default rule measures on the corpus's held-out blocks and records it.
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    corpus = CorpusSource(text=(str(_write_corpus(tmp_path / "corpus", _teacher_documents(teacher, tokenizer, 24))),))
    heal = HealSettings(tokens=4 * BLOCK, block_size=BLOCK, batch_size=4, validation_blocks=4)
    student_dir = init_student(teacher_dir, 4, tmp_path / "student", heal=heal, corpus=corpus)
    manifest = read_student_manifest(student_dir)
    assert manifest["layers_kept"] == [0, 3, 4, 5]
    assert manifest["layer_selection"]["rule"] == "influence"
    assert manifest["layer_selection"]["measured_on"]["fingerprint"] == \
        manifest["healing"]["corpus"]["validation_fingerprint"]


def test_init_student_cache_builds_once_and_prints_the_directory_last(teacher_dir, teacher, tokenizer, tmp_path,
                                                                      monkeypatch, capsys):
    from minillm_rl.cli import main

    monkeypatch.setenv("MINILLM_RL_CACHE", str(tmp_path / "cache"))
    corpus = _write_corpus(tmp_path / "corpus", _teacher_documents(teacher, tokenizer, 24))
    args = ["init-student", "--teacher", str(teacher_dir), "--layers", "2", "--cache", "--heal-tokens", str(2 * 4 * BLOCK),
            "--heal-corpus", str(corpus), "--heal-block-size", str(BLOCK), "--heal-batch-size", "4",
            "--heal-validation-blocks", "4"]
    assert main(args) == 0
    built = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert built.parent == tmp_path / "cache" and built.name.startswith("teacher-student-2l-influence-healed-")
    stamp = (built / MANIFEST_NAME).stat().st_mtime_ns
    assert main(args) == 0  # the same settings: reused, not rebuilt
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == built
    assert (built / MANIFEST_NAME).stat().st_mtime_ns == stamp
    assert main([*args, "--select", "even"]) == 0  # another rule: another student
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) != built
