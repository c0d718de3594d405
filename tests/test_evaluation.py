"""Evaluation: generation on left-padded batches, seeding, the n-gram ban, scores, result files.

Generation is checked against an independent greedy decode of each prompt alone (no padding,
no KV cache); scores against ``metrics`` on the strings actually generated.
"""

from __future__ import annotations

import json

import pytest
from tiny_assets import word_tokenizer
import torch
from conftest import make_tiny_lm

from minillm_rl.data import TokenizedExample
from minillm_rl.evaluation.protocol import (
    EvalConfig,
    evaluate,
    generate_responses,
    markdown_table,
    write_eval_outputs,
)
from minillm_rl.evaluation.metrics import exact_match, rouge_l

torch.set_num_threads(2)

PAD, EOS = 0, 1
WORDS = [f"w{i}" for i in range(29)]
VOCAB = 3 + len(WORDS)
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14], [15, 16], [17, 18, 19, 20]]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def _greedy_alone(model, tokenizer, prompt: list[int], max_new_tokens: int) -> str:
    """Argmax decoding of one unpadded prompt, full forward each step."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        next_id = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if next_id == EOS:
            break
        ids.append(next_id)
    return tokenizer.decode(ids[len(prompt):], skip_special_tokens=True).strip()


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_left_padded_batch_matches_greedy_decoding_of_each_prompt_alone(arch, tokenizer):
    model = make_tiny_lm(arch, VOCAB, init_std=0.5)
    cfg = EvalConfig(seeds=(0,), top_k=1, no_repeat_ngram_size=0, max_new_tokens=10, batch_size=8)
    batched = generate_responses(model, tokenizer, PROMPTS, cfg, seed=0)
    expected = [_greedy_alone(model, tokenizer, p, cfg.max_new_tokens) for p in PROMPTS]
    assert batched == expected
    assert any(batched), "every greedy continuation is empty; the comparison proves nothing"


def _sampling_cfg(**overrides) -> EvalConfig:
    settings = dict(seeds=(1,), no_repeat_ngram_size=0, max_new_tokens=12, batch_size=2)
    return EvalConfig(**{**settings, **overrides})


def test_sampling_is_deterministic_per_seed_and_leaves_global_rng_alone(tokenizer):
    model = make_tiny_lm("gpt2", VOCAB)
    cfg = _sampling_cfg()
    torch.manual_seed(123)
    first = generate_responses(model, tokenizer, PROMPTS, cfg, seed=7)
    after_call = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_call)
    assert generate_responses(model, tokenizer, PROMPTS, cfg, seed=7) == first
    assert generate_responses(model, tokenizer, PROMPTS, cfg, seed=8) != first


def test_results_do_not_depend_on_the_models_generation_defaults(tokenizer):
    model = make_tiny_lm("gpt2", VOCAB)
    cfg = _sampling_cfg()
    plain = generate_responses(model, tokenizer, PROMPTS, cfg, seed=3)
    # transformers' own default would apply top_k=50 / these if not pinned by the protocol.
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.top_k = 2
    model.generation_config.min_new_tokens = 12
    assert generate_responses(model, tokenizer, PROMPTS, cfg, seed=3) == plain


def _repetitive_model():
    """A GPT-2 whose next-token distribution is the same at every position: almost surely ``w0``,
    never a special token. Tied embeddings make the output logits ``wte @ ln_f.bias``."""
    model = make_tiny_lm("gpt2", VOCAB)
    favoured = 3
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        direction = model.transformer.wte.weight[favoured].clone()
        direction /= direction.norm()
        model.transformer.wte.weight[[PAD, EOS, 2]] = -direction
        model.transformer.wte.weight[favoured] = direction
        model.transformer.ln_f.bias.copy_(20.0 * direction)
    return model


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@pytest.mark.parametrize("ngram_size", [2, 3])
def test_no_repeat_ngram_size_is_honoured(ngram_size, tokenizer):
    model = _repetitive_model()
    unbanned = generate_responses(model, tokenizer, PROMPTS, _sampling_cfg(), seed=0)
    assert all(len(set(_ngrams(r.split(), ngram_size))) < len(r.split()) - ngram_size + 1
               for r in unbanned), "the model does not repeat; the ban would be untested"
    cfg = _sampling_cfg(no_repeat_ngram_size=ngram_size)
    banned = generate_responses(model, tokenizer, PROMPTS, cfg, seed=0)
    for prompt, response in zip(PROMPTS, banned):
        prompt_words = tokenizer.decode(prompt).split()
        whole = prompt_words + response.split()
        assert len(response.split()) == cfg.max_new_tokens
        assert len(set(_ngrams(whole, ngram_size))) == len(_ngrams(whole, ngram_size)), whole


def _examples() -> list[TokenizedExample]:
    return [TokenizedExample(prompt_ids=p, response_ids=[4, EOS], source="test") for p in PROMPTS]


def test_evaluate_scores_match_metrics_on_each_seeds_predictions(tokenizer):
    model = make_tiny_lm("gpt2", VOCAB)
    references = [["w3 w4 w5 w6", "w7 w8"], ["w9 w10 w11"], ["w12"], ["w13 w14 w3"], ["w5 w6 w7"]]
    cfg = _sampling_cfg(seeds=(10, 20, 30))
    result = evaluate(model, tokenizer, _examples(), references, cfg)

    per_seed = [generate_responses(model, tokenizer, PROMPTS, cfg, s) for s in cfg.seeds]
    expected_rouge = [rouge_l(predictions, references) for predictions in per_seed]
    assert result.rouge_l_per_seed == pytest.approx(expected_rouge, abs=1e-12)
    assert max(expected_rouge) > 0, "no overlap at all; the Rouge-L comparison proves little"
    assert result.rouge_l == pytest.approx(sum(expected_rouge) / 3, abs=1e-12)
    mean = result.rouge_l
    assert result.rouge_l_std == pytest.approx(
        (sum((r - mean) ** 2 for r in expected_rouge) / 3) ** 0.5, abs=1e-12)
    assert result.exact_match_per_seed == [exact_match(p, references) for p in per_seed]
    assert [a["prediction"] for a in result.answers] == per_seed[0]
    assert result.answers[2] == {"prompt": "w6 w7 w8 w9 w10 w11", "prediction": per_seed[0][2],
                                 "references": ["w12"]}
    assert (result.protocol, result.num_examples, result.settings["seeds"]) == ("test", 5, (10, 20, 30))


def test_evaluate_exact_match_counts_matching_predictions(tokenizer):
    model = make_tiny_lm("gpt2", VOCAB, init_std=0.5)
    cfg = _sampling_cfg(seeds=(1, 2), top_k=1, max_new_tokens=6)
    greedy = generate_responses(model, tokenizer, PROMPTS, cfg, seed=0)
    # A reference equal to the prediction up to case and punctuation, and four that cannot match.
    references = [[greedy[0].upper() + "!"]] + [["no such answer"]] * 4
    result = evaluate(model, tokenizer, _examples(), references, cfg)
    assert result.exact_match_per_seed == [20.0, 20.0]
    assert result.exact_match == 20.0 and result.exact_match_std == 0.0


def test_evaluate_refuses_mismatched_references(tokenizer):
    with pytest.raises(ValueError, match="5 examples but 4 reference lists"):
        evaluate(make_tiny_lm("gpt2", VOCAB), tokenizer, _examples(), [["a"]] * 4, _sampling_cfg())


def test_protocols_and_config_validation():
    test = EvalConfig.test()
    assert (test.seeds, test.temperature, test.top_k, test.top_p, test.no_repeat_ngram_size) == (
        (10, 20, 30, 40, 50), 1.0, 0, 1.0, 6)
    validation = EvalConfig.validation(temperature=0.8, top_p=0.9, seed=3)
    assert (validation.seeds, validation.no_repeat_ngram_size, validation.protocol) == ((3,), 0, "validation")
    assert (validation.temperature, validation.top_p) == (0.8, 0.9)
    for bad, field_name in [(dict(seeds=()), "seeds"), (dict(temperature=0.0), "temperature"),
                            (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"),
                            (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
                            (dict(batch_size=0), "batch_size")]:
        with pytest.raises(ValueError, match=f"EvalConfig.{field_name}="):
            EvalConfig(**bad)


def test_empty_prompt_is_refused(tokenizer):
    with pytest.raises(ValueError, match=r"prompt_id_lists\[1\] is empty"):
        generate_responses(make_tiny_lm("gpt2", VOCAB), tokenizer, [[5], []], _sampling_cfg(), 0)


def test_markdown_table_layout_and_escaping():
    table = markdown_table([{"model": "a|b", "rouge_l": 12.3456}, {"model": "c"}], ["model", "rouge_l"])
    assert table.splitlines() == ["| model | rouge_l |", "|---|---|", "| a\\|b | 12.35 |", "| c |  |"]


def _result(tokenizer):
    cfg = _sampling_cfg(seeds=(1, 2), max_new_tokens=4)
    return evaluate(make_tiny_lm("gpt2", VOCAB), tokenizer, _examples(), [["w3"]] * 5, cfg)


def test_write_eval_outputs_writes_complete_files_and_no_temporaries(tmp_path, tokenizer):
    result = _result(tokenizer)
    write_eval_outputs(result, tmp_path / "eval", name="student")
    out = tmp_path / "eval"
    assert sorted(p.name for p in out.iterdir()) == ["answers.jsonl", "results.json", "results.md"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == "student" and saved["rouge_l"] == result.rouge_l
    assert saved["rouge_l_per_seed"] == result.rouge_l_per_seed and "answers" not in saved
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert answers == result.answers
    markdown = (out / "results.md").read_text()
    assert "| model | protocol | rouge_l |" in markdown and "| student | test |" in markdown


def test_failed_write_leaves_the_previous_results_intact(tmp_path, tokenizer):
    result = _result(tokenizer)
    write_eval_outputs(result, tmp_path)
    before = (tmp_path / "results.json").read_text()
    result.rouge_l_per_seed = [1.0, object()]  # fails halfway through json.dump
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_eval_outputs(result, tmp_path)
    assert (tmp_path / "results.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "results.json", "results.md"]
