"""Evaluation (spec §6): sampled generation, Rouge-L / exact match over seeds, the distillation
metrics with bootstrap intervals (:func:`evaluate_models`), result files.

Two protocols, recorded with every number because they differ by about a point:
``test`` samples at temperature 1 with ``no_repeat_ngram_size = 6`` and averages 5 seeds;
``validation`` (checkpoint selection during training) samples once at the training settings.

Over 400 lines: generation, both entry points (:func:`evaluate` for validation,
:func:`evaluate_models` for the test) and the result files all share :class:`EvalResult` and the
protocol settings; the metric math itself lives in ``metrics``, ``distill`` and ``stats``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from transformers import GenerationConfig

from minillm_rl.algorithm.batching import left_pad
from minillm_rl.data import TokenizedExample
from minillm_rl.evaluation.distill import DEFAULT_MAX_LOGIT_ELEMENTS, score_responses
from minillm_rl.evaluation.metrics import answer_shape_scores, exact_match_scores, rouge_l_scores
from minillm_rl.evaluation.stats import BootstrapConfig, bootstrap_mean
from minillm_rl.tracking import write_atomic

TEST_SEEDS = (10, 20, 30, 40, 50)

# A checkpoint's generation_config.json (and transformers' own defaults, e.g. top_k=50) fill every
# setting left unset here; pinning these keeps the protocol the same for every model.
_NEUTRAL_GENERATION_SETTINGS = dict(
    num_beams=1, repetition_penalty=1.0, typical_p=1.0, min_p=0.0, epsilon_cutoff=0.0,
    eta_cutoff=0.0, min_new_tokens=0,
)


@dataclass(frozen=True)
class EvalConfig:
    """Decoding settings and seeds of one evaluation protocol (``no_repeat_ngram_size`` 0 = off)."""

    seeds: tuple[int, ...] = TEST_SEEDS
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 6
    max_new_tokens: int = 256
    batch_size: int = 16
    protocol: str = "test"

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(self.seeds))
        checks = [
            ("seeds", len(self.seeds) >= 1 and all(isinstance(s, int) for s in self.seeds),
             "a non-empty sequence of ints"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, ">= 0 (0 = off)"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("protocol", isinstance(self.protocol, str) and bool(self.protocol), "a non-empty name"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"EvalConfig.{name}={getattr(self, name)!r}; expected {expected}")

    @classmethod
    def test(cls, max_new_tokens: int = 256, batch_size: int = 16,
             seeds: Sequence[int] = TEST_SEEDS) -> EvalConfig:
        """The spec's test protocol: temperature 1, no top-k/top-p, no repeated 6-grams, 5 seeds."""
        return cls(seeds=tuple(seeds), max_new_tokens=max_new_tokens, batch_size=batch_size)

    @classmethod
    def validation(cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   max_new_tokens: int = 256, batch_size: int = 16, seed: int = 10) -> EvalConfig:
        """Checkpoint-selection protocol: one seed, the training sampling settings, no n-gram ban."""
        return cls(seeds=(seed,), temperature=temperature, top_k=top_k, top_p=top_p,
                   no_repeat_ngram_size=0, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   protocol="validation")


def _generation_config(cfg: EvalConfig, eos_token_id: int, pad_token_id: int) -> GenerationConfig:
    return GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size, max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, **_NEUTRAL_GENERATION_SETTINGS,
    )


def _special_ids(tokenizer) -> tuple[int, int]:
    """``(eos_token_id, pad_token_id)``; the pad falls back to EOS (only ever masked out)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; expected one to end generations")
    pad_token_id = tokenizer.pad_token_id
    return tokenizer.eos_token_id, tokenizer.eos_token_id if pad_token_id is None else pad_token_id


@torch.no_grad()
def generate_token_ids(model, tokenizer, prompt_id_lists: Sequence[Sequence[int]], cfg: EvalConfig, seed: int,
                       synced_gpus: bool = False) -> list[list[int]]:
    """Sampled responses as token ids, one list per prompt in the input order: the new tokens up
    to and including the first EOS (all ``max_new_tokens`` of them when there is none).

    Prompts are batched by length (less padding) and left-padded with an explicit attention mask;
    ``generate`` derives position ids from that mask. The draws depend only on ``seed`` (and the
    prompts, ``cfg``); the caller's global RNG state is left as it was. ``synced_gpus``: ZeRO-3
    (every forward is collective): each rank must pass as many prompts, and keeps stepping until
    every rank's batch is done.
    """
    if any(len(ids) == 0 for ids in prompt_id_lists):
        empty = next(i for i, ids in enumerate(prompt_id_lists) if len(ids) == 0)
        raise ValueError(f"prompt_id_lists[{empty}] is empty; expected at least one token")
    eos_token_id, pad_token_id = _special_ids(tokenizer)
    generation_config = _generation_config(cfg, eos_token_id, pad_token_id)
    order = sorted(range(len(prompt_id_lists)), key=lambda i: len(prompt_id_lists[i]))
    responses: list[list[int]] = [[] for _ in prompt_id_lists]
    cuda_devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        for start in range(0, len(order), cfg.batch_size):
            batch_rows = order[start : start + cfg.batch_size]
            prompt_ids, prompt_mask = left_pad([prompt_id_lists[i] for i in batch_rows], pad_token_id)
            output_ids = model.generate(
                input_ids=prompt_ids.to(model.device), attention_mask=prompt_mask.to(model.device),
                generation_config=generation_config, synced_gpus=synced_gpus,
            )
            for row, token_ids in zip(batch_rows, output_ids[:, prompt_ids.shape[1]:].tolist()):
                # generate pads finished rows after their EOS.
                responses[row] = token_ids[: token_ids.index(eos_token_id) + 1] if eos_token_id in token_ids \
                    else token_ids
    return responses


def _decode(tokenizer, token_id_lists: Sequence[Sequence[int]]) -> list[str]:
    """The text of each response, EOS and other special tokens dropped, stripped."""
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_id_lists]


def generate_responses(model, tokenizer, prompt_id_lists: Sequence[Sequence[int]],
                       cfg: EvalConfig, seed: int, synced_gpus: bool = False) -> list[str]:
    """The decoded text of :func:`generate_token_ids` (the tokens before the first EOS)."""
    return _decode(tokenizer, generate_token_ids(model, tokenizer, prompt_id_lists, cfg, seed, synced_gpus))


# The metrics of :func:`evaluate_models`, in table order: key -> label. "Student" is the evaluated
# model (``--model``); shares are x 100; NLL and KL are nats per token.
METRICS = {
    "rouge_l": "Rouge-L vs reference",
    "exact_match": "exact match (%)",
    "rouge_l_teacher": "Rouge-L vs teacher answer",
    "reverse_kl": "reverse KL(q‖p) / token, own answers",
    "teacher_nll": "teacher NLL / token of answers",
    "student_nll_reference": "student NLL / token of references",
    "student_nll_teacher": "student NLL / token of teacher answers",
    "distinct_1": "distinct-1 (%)",
    "distinct_2": "distinct-2 (%)",
    "repeated_4gram_rate": "repeated 4-grams (%)",
    "length": "length (tokens)",
    "eos_rate": "ended with EOS (%)",
}


@dataclass
class EvalResult:
    """Scores (x 100) of one model under one protocol; ``*_std`` is the population std over seeds.

    ``answers``: ``{"prompt", "prediction", "references"}`` per example, ``prediction`` from the
    first seed; :func:`evaluate_models` adds ``teacher_answer`` (first seed),
    ``student_nll_reference`` and ``samples`` (every seed's answers and per-answer metrics).
    From :func:`evaluate_models` only: ``metrics`` (key of :data:`METRICS` -> mean, bootstrap
    interval ``low``/``high``, ``num_prompts``), ``per_prompt`` (key -> one value per example,
    averaged over the seeds; ``None`` where undefined) and ``prompt_keys`` (a hash of each
    example's prompt text, so a report can check that two runs scored the same prompts).
    """

    protocol: str
    num_examples: int
    rouge_l: float
    rouge_l_std: float
    rouge_l_per_seed: list[float]
    exact_match: float
    exact_match_std: float
    exact_match_per_seed: list[float]
    settings: dict[str, Any] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_prompt: dict[str, list[float | None]] = field(default_factory=dict)
    prompt_keys: list[str] = field(default_factory=list)

    def to_dict(self, include_answers: bool = True) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not include_answers:
            del data["answers"]
        return data


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _defined_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _mean_defined(values: list[float]) -> float | None:
    """Mean of the non-NaN ``values``; ``None`` when there is none."""
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else None


def _check_references(examples: Sequence[TokenizedExample], references: Sequence[Sequence[str]]) -> None:
    if len(references) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(references)} reference lists; "
                         "expected one list of reference strings per example")


def _seed_result(cfg: EvalConfig, tokenizer, examples: Sequence[TokenizedExample],
                 references: Sequence[Sequence[str]], rouge_per_seed: list[list[float]],
                 exact_per_seed: list[list[float]], first_predictions: list[str]) -> EvalResult:
    """The Rouge-L / exact-match result from per-seed, per-example scores."""
    rouge_means, exact_means = [_mean(v) for v in rouge_per_seed], [_mean(v) for v in exact_per_seed]
    answers = [
        {"prompt": tokenizer.decode(example.prompt_ids, skip_special_tokens=True),
         "prediction": prediction, "references": list(refs)}
        for example, prediction, refs in zip(examples, first_predictions, references)
    ]
    return EvalResult(
        protocol=cfg.protocol, num_examples=len(examples),
        rouge_l=_mean(rouge_means), rouge_l_std=statistics.pstdev(rouge_means), rouge_l_per_seed=rouge_means,
        exact_match=_mean(exact_means), exact_match_std=statistics.pstdev(exact_means),
        exact_match_per_seed=exact_means, settings=dataclasses.asdict(cfg), answers=answers,
    )


def evaluate(model, tokenizer, examples: Sequence[TokenizedExample],
             references: Sequence[Sequence[str]], cfg: EvalConfig,
             generate: Callable[[list[list[int]], int], list[str]] | None = None) -> EvalResult:
    """Generate for every example under each seed of ``cfg`` and score against ``references``
    (one non-empty list of reference strings per example): Rouge-L and exact match only (the
    validation path; :func:`evaluate_models` adds the distillation metrics).
    ``generate(prompt id lists, seed)`` replaces :func:`generate_responses` on ``model`` (e.g.
    generation on the rollout workers)."""
    _check_references(examples, references)
    prompt_id_lists = [example.prompt_ids for example in examples]
    rouge_per_seed, exact_per_seed, first_predictions = [], [], None
    for seed in cfg.seeds:
        predictions = generate(prompt_id_lists, seed) if generate is not None \
            else generate_responses(model, tokenizer, prompt_id_lists, cfg, seed)
        rouge_per_seed.append(rouge_l_scores(predictions, references))
        exact_per_seed.append(exact_match_scores(predictions, references))
        first_predictions = predictions if first_predictions is None else first_predictions
    return _seed_result(cfg, tokenizer, examples, references, rouge_per_seed, exact_per_seed, first_predictions)


def _prompt_key(prompt_text: str) -> str:
    return hashlib.sha256(prompt_text.encode("utf-8")).hexdigest()[:16]


def evaluate_models(student, tokenizer, examples: Sequence[TokenizedExample], references: Sequence[Sequence[str]],
                    cfg: EvalConfig, teacher=None, bootstrap: BootstrapConfig = BootstrapConfig(),
                    max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS,
                    teacher_samples: dict[int, list[list[int]]] | None = None) -> EvalResult:
    """The test evaluation of already-loaded models with the distillation metrics (spec §6).

    Under each seed of ``cfg`` the student samples one answer per example (the draws of
    :func:`evaluate`), and a ``teacher`` (sharing ``tokenizer``) samples one under the same
    protocol and seed. Per answer: Rouge-L and exact match against ``references``,
    :func:`~minillm_rl.evaluation.metrics.answer_shape_scores`, and with a teacher the reverse KL
    and the teacher's NLL of the student's answer, the student's NLL of the teacher's answer and
    Rouge-L against it (:func:`~minillm_rl.evaluation.distill.score_responses`, exact over the
    vocabulary, ``max_logit_elements`` per forward). Per example these are averaged over the
    seeds, the student's NLL of the reference (``example.response_ids``) is added, and every
    metric gets a percentile bootstrap interval over the examples (:mod:`~minillm_rl.evaluation.stats`).

    ``teacher_samples``: a dict (seed -> the teacher's answer ids) shared by the evaluations of
    several students on the same examples: the teacher's answers depend only on the seed, so
    they are sampled once and reused.
    """
    _check_references(examples, references)
    eos_token_id, pad_token_id = _special_ids(tokenizer)
    prompt_id_lists = [example.prompt_ids for example in examples]
    per_seed: list[dict[str, list[float]]] = []
    samples: list[list[dict[str, Any]]] = [[] for _ in examples]
    for seed in cfg.seeds:
        answer_ids = generate_token_ids(student, tokenizer, prompt_id_lists, cfg, seed)
        texts = {"prediction": _decode(tokenizer, answer_ids)}
        scores = {"rouge_l": rouge_l_scores(texts["prediction"], references),
                  "exact_match": exact_match_scores(texts["prediction"], references),
                  **answer_shape_scores(answer_ids, eos_token_id)}
        if teacher is not None:
            cached = teacher_samples is not None and seed in teacher_samples
            teacher_ids = teacher_samples[seed] if cached else \
                generate_token_ids(teacher, tokenizer, prompt_id_lists, cfg, seed)
            if teacher_samples is not None:
                teacher_samples[seed] = teacher_ids
            texts["teacher_answer"] = _decode(tokenizer, teacher_ids)
            judged = score_responses(student, prompt_id_lists, answer_ids, pad_token_id, teacher, max_logit_elements)
            on_teacher_answers = score_responses(student, prompt_id_lists, teacher_ids, pad_token_id,
                                                 max_logit_elements=max_logit_elements)
            scores.update(rouge_l_teacher=rouge_l_scores(texts["prediction"], texts["teacher_answer"]),
                          reverse_kl=judged.reverse_kl, teacher_nll=judged.teacher_nll,
                          student_nll_teacher=on_teacher_answers.student_nll)
        per_seed.append(scores)
        for index, example_samples in enumerate(samples):
            example_samples.append({"seed": seed, **{key: text[index] for key, text in texts.items()},
                                    "metrics": {key: _defined_or_none(v[index]) for key, v in scores.items()}})
    reference_nll = score_responses(student, prompt_id_lists, [example.response_ids for example in examples],
                                    pad_token_id, max_logit_elements=max_logit_elements).student_nll
    per_prompt: dict[str, list[float | None]] = {"student_nll_reference": list(reference_nll)}
    for key in per_seed[0]:
        per_prompt[key] = [_mean_defined([seed_scores[key][i] for seed_scores in per_seed])
                           for i in range(len(examples))]
    result = _seed_result(cfg, tokenizer, examples, references, [s["rouge_l"] for s in per_seed],
                          [s["exact_match"] for s in per_seed], [s[0]["prediction"] for s in samples])
    result.per_prompt = {key: per_prompt[key] for key in METRICS if key in per_prompt}
    result.metrics = {key: bootstrap_mean(values, bootstrap).to_dict() for key, values in result.per_prompt.items()}
    result.prompt_keys = [_prompt_key(answer["prompt"]) for answer in result.answers]
    for answer, example_samples, nll in zip(result.answers, samples, reference_nll):
        if teacher is not None:
            answer["teacher_answer"] = example_samples[0]["teacher_answer"]
        answer.update(student_nll_reference=nll, samples=example_samples)
    result.settings["bootstrap"] = dataclasses.asdict(bootstrap)
    return result


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    # A bare "|" would split the cell; newlines would end the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``rows`` (floats to 2 decimals; a missing key = empty cell)."""
    if not columns:
        raise ValueError("markdown_table: expected at least one column")
    lines = ["| " + " | ".join(_format_cell(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


RESULT_COLUMNS = ("model", "protocol", "rouge_l", "rouge_l_std", "exact_match", "num_examples", "seeds")


def result_row(result: EvalResult, name: str) -> dict[str, Any]:
    """One row of :data:`RESULT_COLUMNS` for :func:`markdown_table`."""
    return {"model": name, "protocol": result.protocol, "rouge_l": result.rouge_l,
            "rouge_l_std": result.rouge_l_std, "exact_match": result.exact_match,
            "num_examples": result.num_examples,
            "seeds": ",".join(str(s) for s in result.settings.get("seeds", ()))}


def interval_cell(summary: dict[str, Any]) -> str:
    """``"mean [low, high]"`` of an :meth:`~minillm_rl.evaluation.stats.Interval.to_dict`; empty
    when no prompt had a value."""
    if summary["mean"] is None:
        return ""
    return f"{summary['mean']:.2f} [{summary['low']:.2f}, {summary['high']:.2f}]"


def metrics_table(result: EvalResult) -> str:
    """One row per metric of ``result.metrics``: label, mean with interval, prompts it is defined on."""
    rows = [{"metric": METRICS[key], "mean [interval]": interval_cell(summary), "prompts": summary["num_prompts"]}
            for key, summary in result.metrics.items()]
    return markdown_table(rows, ("metric", "mean [interval]", "prompts"))


def write_eval_outputs(result: EvalResult, out_dir: str | os.PathLike, name: str = "model") -> Path:
    """Write ``answers.jsonl``, ``results.md`` and ``results.json`` (last) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write_answers(file: IO[str]) -> None:
        for answer in result.answers:
            file.write(json.dumps(answer, ensure_ascii=False) + "\n")

    def write_results(file: IO[str]) -> None:
        json.dump({"model": name, **result.to_dict(include_answers=False)}, file, indent=2)
        file.write("\n")

    text = f"# Evaluation: {name}\n\n{markdown_table([result_row(result, name)], RESULT_COLUMNS)}"
    if result.metrics:
        boot = result.settings["bootstrap"]
        text += (f"\n{metrics_table(result)}\nMeans over {result.num_examples} prompts (each averaged over the "
                 f"seeds); {100 * boot['confidence']:g} % percentile bootstrap intervals over prompts "
                 f"({boot['resamples']} resamples, seed {boot['seed']}).\n")
    write_atomic(out_dir / "answers.jsonl", write_answers)
    write_atomic(out_dir / "results.md", lambda file: file.write(text))
    write_atomic(out_dir / "results.json", write_results)
    return out_dir


def check_eval_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """``minillm-rl eval --out``: refuse a non-empty directory unless ``overwrite``, so that an
    evaluation never silently replaces another's results (e.g. a run's own test stage in
    ``RUN/eval``). Checked before any model is loaded."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a directory")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise ValueError(f"--out {out_dir}: not empty (it holds {', '.join(sorted(p.name for p in path.iterdir())[:4])}"
                         f"); choose a new directory, or add --overwrite to replace its results")


def evaluate_on_data(model_source: str, data_source: str, out_dir: str | os.PathLike, cfg: EvalConfig,
                     template: str = "minillm", max_prompt_tokens: int = 256, num_examples: int | None = None,
                     split: str = "test", dtype: str = "float32", device: str = "auto",
                     gguf_file: str | None = None, teacher_source: str | None = None,
                     teacher_gguf_file: str | None = None,
                     bootstrap: BootstrapConfig = BootstrapConfig(),
                     teacher_samples: dict[int, list[list[int]]] | None = None) -> EvalResult:
    """``minillm-rl eval``: load a model (an HF directory, a hub name, or ``gguf_file`` in the
    ``model_source`` directory) in ``dtype`` on ``device``, optionally a teacher the same way,
    and instruction data; :func:`evaluate_models`; write the result files.

    References are the data's responses, untruncated; prompts over ``max_prompt_tokens`` are
    dropped (and counted in ``results.json`` under ``settings.preparation``). The teacher must
    share the model's tokenizer. ``teacher_samples``: see :func:`evaluate_models`.
    """
    from minillm_rl.data import load_instructions, tokenize_examples
    from minillm_rl.models import check_tokenizers_compatible, load_causal_lm, load_tokenizer, resolve_device, \
        torch_dtype

    target_dtype, target_device = torch_dtype(dtype), resolve_device(device)
    tokenizer = load_tokenizer(model_source, gguf_file=gguf_file)
    if teacher_source is not None:
        teacher_tokenizer = load_tokenizer(teacher_source, gguf_file=teacher_gguf_file)
        try:
            check_tokenizers_compatible(teacher_tokenizer, tokenizer)
        except ValueError as err:
            raise ValueError(f"--teacher {teacher_source}: {err}; expected the model's tokenizer") from None
    model = load_causal_lm(model_source, dtype=target_dtype, gguf_file=gguf_file).to(target_device)
    loaded = load_instructions(data_source, split=split, max_examples=num_examples)
    by_source = {example.source: example for example in loaded.examples}
    examples, counts = tokenize_examples(loaded.examples, tokenizer, max_prompt_tokens, cfg.max_new_tokens, template)
    if not examples:
        raise ValueError(f"{data_source}: no example has a prompt within {max_prompt_tokens} tokens")
    references = [[by_source[example.source].response] for example in examples]
    teacher = None if teacher_source is None else \
        load_causal_lm(teacher_source, dtype=target_dtype, gguf_file=teacher_gguf_file).to(target_device)
    result = evaluate_models(model, tokenizer, examples, references, cfg, teacher, bootstrap,
                             teacher_samples=teacher_samples)
    result.settings["preparation"] = dataclasses.asdict(counts)
    result.settings["model"] = {"source": str(model_source), "gguf_file": gguf_file, "dtype": dtype,
                                "device": str(target_device)}
    result.settings["teacher"] = None if teacher_source is None else \
        {"source": str(teacher_source), "gguf_file": teacher_gguf_file}
    write_eval_outputs(result, out_dir, name=str(model_source))
    return result
