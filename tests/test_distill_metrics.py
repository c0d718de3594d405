"""The distillation metrics of ``minillm-rl eval`` (evaluation/distill.py, ``evaluate_models``).

Per position against a float64 copy of each model run on each unpadded sequence alone; the
per-token reverse KL summed over a response and averaged under the student is the sequence-level
KL(q || p) obtained by enumerating every response of a tiny model (the chain rule: this fails if a
position is shifted, the EOS position is dropped or the KL is not over the full vocabulary); the
whole ``evaluate_models`` pipeline (sampling with HF ``generate``, scoring, averaging) has the
expectation computed by that enumeration, within Monte-Carlo error.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny_lm
from exact import all_responses, reverse_kl, sequence_logprobs
from tiny_assets import word_tokenizer

from minillm_rl.algorithm.batching import left_pad, right_pad
from minillm_rl.data import TokenizedExample
from minillm_rl.evaluation.distill import _groups, score_responses, token_scores
from minillm_rl.evaluation.metrics import rouge_l_scores
from minillm_rl.evaluation.protocol import METRICS, EvalConfig, evaluate, evaluate_models, generate_responses

torch.set_num_threads(1)

PAD, EOS = 0, 1
VOCAB = 13
PROMPTS = [[3, 4, 5], [6], [7, 8, 9, 10, 11], [12, 3]]
# Ragged: one ends with EOS, one is EOS alone, two were cut at the budget without EOS.
RESPONSES = [[3, 1], [4, 5, 6, 7], [1], [8, 9, 2]]


def _float64_reference(student, teacher, prompt: list[int], response: list[int]):
    """``(log q(y_t), log p(y_t), KL_t)`` ``[T]`` float64 from float64 copies of the models run on
    the unpadded prompt + response."""
    ids = torch.tensor([prompt + response])
    rows = slice(len(prompt) - 1, len(prompt) + len(response) - 1)
    logq = student(ids).logits[0, rows].log_softmax(-1)
    logp = teacher(ids).logits[0, rows].log_softmax(-1)
    y = torch.tensor(response)[:, None]
    return logq.gather(-1, y)[:, 0], logp.gather(-1, y)[:, 0], (logq.exp() * (logq - logp)).sum(-1)


@pytest.fixture(scope="module", params=["gpt2", "opt", "llama"])
def pair(request):
    student = make_tiny_lm(request.param, VOCAB, seed=0, init_std=0.5)
    teacher = make_tiny_lm(request.param, VOCAB, num_layers=3, seed=1, init_std=0.5)
    return student, teacher


@torch.no_grad()
def test_per_position_scores_match_float64(pair):
    student, teacher = pair
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD)
    response_ids, response_mask = right_pad(RESPONSES, PAD)
    scores = token_scores(student, prompt_ids, prompt_mask, response_ids, response_mask, teacher)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        logq, logp, kl = _float64_reference(student64, teacher64, prompt, response)
        n = len(response)
        torch.testing.assert_close(scores.student_logprobs[row, :n].double(), logq, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores.teacher_logprobs[row, :n].double(), logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores.reverse_kl[row, :n].double(), kl, atol=1e-5, rtol=1e-5)
        for tensor in (scores.student_logprobs, scores.teacher_logprobs, scores.reverse_kl):
            assert (tensor[row, n:] == 0).all()
    assert scores.reverse_kl[response_mask > 0].min() > 0.01, "the models must differ for the test to mean anything"


@torch.no_grad()
def test_response_means_are_the_same_for_every_grouping_and_keep_the_input_order(pair):
    student, teacher = pair
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    expected = {"student_nll": [], "teacher_nll": [], "reverse_kl": []}
    for prompt, response in zip(PROMPTS, RESPONSES):
        logq, logp, kl = _float64_reference(student64, teacher64, prompt, response)
        expected["student_nll"].append(-logq.mean().item())
        expected["teacher_nll"].append(-logp.mean().item())
        expected["reverse_kl"].append(kl.mean().item())
    # 1: one row per forward; 4 * 13 * 2: two of the 4-token rows; default: all at once.
    for budget in (1, 4 * VOCAB * 2, None):
        kwargs = {} if budget is None else {"max_logit_elements": budget}
        got = score_responses(student, PROMPTS, RESPONSES, PAD, teacher, **kwargs)
        for name, values in expected.items():
            assert getattr(got, name) == pytest.approx(values, abs=1e-5), (budget, name)
    alone = score_responses(student, PROMPTS, RESPONSES, PAD)
    assert alone.teacher_nll is None and alone.reverse_kl is None
    assert alone.student_nll == pytest.approx(expected["student_nll"], abs=1e-5)


def test_a_forward_never_holds_more_logits_than_the_budget():
    student = make_tiny_lm("llama", VOCAB, seed=0)
    widths = []
    handle = student.register_forward_hook(lambda module, args, output: widths.append(tuple(output.logits.shape)))
    try:
        responses = [[3] * n for n in (1, 7, 2, 7, 3, 5, 1, 6)]
        budget = 2 * 7 * VOCAB  # two of the longest rows
        score_responses(student, [[4, 5]] * len(responses), responses, PAD, max_logit_elements=budget)
    finally:
        handle.remove()
    # The model returns T + 1 rows of logits per sequence (the last predicts past the response).
    assert all(rows * (length - 1) * vocab <= budget for rows, length, vocab in widths)
    assert sum(rows for rows, _, _ in widths) == len(responses) and len(widths) < len(responses)
    # A row wider than the budget still goes through, alone.
    assert _groups([0, 1], [3, 9], VOCAB, 1) == [[0], [1]]
    assert score_responses(student, [], [], PAD).student_nll == []


def test_bad_inputs_are_one_line_errors():
    student = make_tiny_lm("gpt2", VOCAB)
    with pytest.raises(ValueError, match=r"response_id_lists\[1\] is empty"):
        score_responses(student, [[3], [4]], [[5], []], PAD)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_responses(student, [[3], [4]], [[5]], PAD)
    with pytest.raises(ValueError, match="teacher has 14 logits, student 13"):
        score_responses(student, [[3]], [[5]], PAD, teacher=make_tiny_lm("gpt2", VOCAB + 1))


# ------------------------------------------------- exact enumeration (vocab 5, at most 3 tokens)

TINY_VOCAB, HORIZON, PROMPT = 5, 3, [3, 4]


@pytest.fixture(scope="module")
def tiny_pair():
    return (make_tiny_lm("gpt2", TINY_VOCAB, seed=0, init_std=0.5),
            make_tiny_lm("gpt2", TINY_VOCAB, num_layers=3, seed=3, init_std=0.5))


@pytest.fixture(scope="module")
def enumerated(tiny_pair):
    """Every response, its probability under each model and its scores (as score_responses gives them)."""
    student, teacher = tiny_pair
    responses = all_responses(TINY_VOCAB, EOS, HORIZON)
    with torch.no_grad():
        q = sequence_logprobs(student, PROMPT, responses).exp()
        p = sequence_logprobs(teacher, PROMPT, responses).exp()
    judged = score_responses(student, [PROMPT] * len(responses), responses, PAD, teacher)
    on_teacher = score_responses(student, [PROMPT] * len(responses), responses, PAD)
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.float64)
    return {"responses": responses, "q": q, "p": p, "lengths": lengths,
            "reverse_kl": torch.tensor(judged.reverse_kl, dtype=torch.float64),
            "teacher_nll": torch.tensor(judged.teacher_nll, dtype=torch.float64),
            "student_nll": torch.tensor(on_teacher.student_nll, dtype=torch.float64)}


def test_summed_per_token_kl_is_the_sequence_level_kl_by_enumeration(tiny_pair, enumerated):
    student, teacher = tiny_pair
    q, p, lengths = enumerated["q"], enumerated["p"], enumerated["lengths"]
    assert q.sum().item() == pytest.approx(1.0, abs=1e-9) and p.sum().item() == pytest.approx(1.0, abs=1e-9)
    with torch.no_grad():
        exact_kl = reverse_kl(student, teacher, PROMPT, TINY_VOCAB, EOS, HORIZON).item()
    assert exact_kl > 0.1, "the models must differ for the test to mean anything"
    # E_q[sum_t KL_t] = KL(q || p) over sequences (chain rule).
    assert (q * lengths * enumerated["reverse_kl"]).sum().item() == pytest.approx(exact_kl, rel=1e-5)
    # E_q[sum_t -log p(y_t)] = -sum_y q(y) log p(y); E_p[sum_t -log q(y_t)] = -sum_y p(y) log q(y).
    assert (q * lengths * enumerated["teacher_nll"]).sum().item() == pytest.approx(-(q * p.log()).sum().item(),
                                                                                 rel=1e-5)
    assert (p * lengths * enumerated["student_nll"]).sum().item() == pytest.approx(-(p * q.log()).sum().item(),
                                                                                 rel=1e-5)


def test_evaluate_models_estimates_have_the_enumerated_expectation(tiny_pair, enumerated):
    """3000 copies of one prompt, one seed: each prompt's value is one draw of the estimator, so
    the mean over prompts must be within Monte-Carlo error of the exact expectation."""
    student, teacher = tiny_pair
    tokenizer = word_tokenizer(["a", "b"])
    assert len(tokenizer) == TINY_VOCAB
    num = 3000
    examples = [TokenizedExample(PROMPT, [3, EOS], str(i)) for i in range(num)]
    cfg = EvalConfig(seeds=(7,), top_k=0, no_repeat_ngram_size=0, max_new_tokens=HORIZON, batch_size=1000)
    result = evaluate_models(student, tokenizer, examples, [["a"]] * num, cfg, teacher=teacher)
    q, p, lengths = enumerated["q"], enumerated["p"], enumerated["lengths"]
    ends_with_eos = torch.tensor([float(r[-1] == EOS) for r in enumerated["responses"]], dtype=torch.float64)
    expected = {  # metric -> (exact expectation, per-draw standard deviation)
        "reverse_kl": (q, enumerated["reverse_kl"]), "teacher_nll": (q, enumerated["teacher_nll"]),
        "student_nll_teacher": (p, enumerated["student_nll"]), "length": (q, lengths - ends_with_eos),
        "eos_rate": (q, 100 * ends_with_eos),
    }
    for name, (probs, values) in expected.items():
        mean = (probs * values).sum().item()
        std = math.sqrt((probs * (values - mean) ** 2).sum().item())
        got = result.metrics[name]
        z = (got["mean"] - mean) / (std / math.sqrt(num))
        assert abs(z) < 4.5, f"{name}: {got['mean']:.4f} vs exact {mean:.4f} (z = {z:.1f})"
        assert got["low"] < got["mean"] < got["high"] and got["num_prompts"] == num
    reference_nll = -sequence_logprobs(student, PROMPT, [[3, EOS]]).item() / 2
    assert result.per_prompt["student_nll_reference"] == pytest.approx([reference_nll] * num, abs=1e-5)


# ------------------------------------------------- what evaluate_models writes per answer

WORDS = [f"w{i}" for i in range(20)]


def test_evaluate_models_scores_the_same_samples_as_rouge_and_keeps_the_teacher_answers():
    tokenizer = word_tokenizer(WORDS)
    student = make_tiny_lm("llama", len(tokenizer), seed=0, init_std=0.5)
    teacher = make_tiny_lm("llama", len(tokenizer), num_layers=3, seed=1, init_std=0.5)
    examples = [TokenizedExample(prompt, [5, 6, EOS], str(i)) for i, prompt in enumerate(PROMPTS)]
    references = [["w2 w3"], ["w1"], ["w4 w5 w6"], ["w2"]]
    cfg = EvalConfig(seeds=(3, 4), no_repeat_ngram_size=0, max_new_tokens=5)
    result = evaluate_models(student, tokenizer, examples, references, cfg, teacher=teacher)
    plain = evaluate(student, tokenizer, examples, references, cfg)
    assert result.rouge_l == pytest.approx(plain.rouge_l, abs=1e-9)
    assert [a["prediction"] for a in result.answers] == [a["prediction"] for a in plain.answers]
    assert list(result.per_prompt) == [key for key in METRICS if key in result.per_prompt]
    assert set(result.per_prompt) == set(METRICS) and set(result.metrics) == set(METRICS)
    for seed_index, seed in enumerate(cfg.seeds):
        teacher_answers = generate_responses(teacher, tokenizer, PROMPTS, cfg, seed)
        predictions = generate_responses(student, tokenizer, PROMPTS, cfg, seed)
        samples = [answer["samples"][seed_index] for answer in result.answers]
        assert [s["teacher_answer"] for s in samples] == teacher_answers
        assert [s["prediction"] for s in samples] == predictions
        assert [s["metrics"]["rouge_l_teacher"] for s in samples] == rouge_l_scores(predictions, teacher_answers)
    for key, values in result.per_prompt.items():
        if key == "student_nll_reference":
            continue
        for answer, value in zip(result.answers, values):
            per_answer = [s["metrics"][key] for s in answer["samples"] if s["metrics"][key] is not None]
            assert value == (pytest.approx(sum(per_answer) / len(per_answer)) if per_answer else None), key
    defined = [v for v in result.per_prompt["reverse_kl"] if v is not None]
    assert result.metrics["reverse_kl"]["mean"] == pytest.approx(sum(defined) / len(defined))
    assert len(result.prompt_keys) == len(set(result.prompt_keys)) == len(examples)

    alone = evaluate_models(student, tokenizer, examples, references, cfg)
    assert set(alone.metrics) == set(METRICS) - {"rouge_l_teacher", "reverse_kl", "teacher_nll",
                                                 "student_nll_teacher"}
    assert "teacher_answer" not in alone.answers[0] and alone.rouge_l == pytest.approx(plain.rouge_l, abs=1e-9)
