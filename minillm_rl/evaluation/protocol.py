"""Evaluation (spec §6): sampled generation, Rouge-L / exact match over seeds, result files.

Two protocols, recorded with every number because they differ by about a point:
``test`` samples at temperature 1 with ``no_repeat_ngram_size = 6`` and averages 5 seeds;
``validation`` (checkpoint selection during training) samples once at the training settings.
"""

from __future__ import annotations

import dataclasses
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
from minillm_rl.evaluation.metrics import exact_match_scores, rouge_l_scores
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


def _until_eos(token_ids: list[int], eos_token_id: int) -> list[int]:
    """The tokens before the first EOS (generate pads finished rows after it)."""
    return token_ids[: token_ids.index(eos_token_id)] if eos_token_id in token_ids else token_ids


@torch.no_grad()
def generate_responses(model, tokenizer, prompt_id_lists: Sequence[Sequence[int]],
                       cfg: EvalConfig, seed: int, synced_gpus: bool = False) -> list[str]:
    """Sampled responses, one string per prompt, in the input order.

    Prompts are batched by length (less padding) and left-padded with an explicit attention mask;
    ``generate`` derives position ids from that mask. Only the new tokens up to the first EOS are
    decoded. The draws depend only on ``seed`` (and the prompts, ``cfg``); the caller's global RNG
    state is left as it was. ``synced_gpus``: ZeRO-3 (every forward is collective): each rank
    must pass as many prompts, and keeps stepping until every rank's batch is done.
    """
    if any(len(ids) == 0 for ids in prompt_id_lists):
        empty = next(i for i, ids in enumerate(prompt_id_lists) if len(ids) == 0)
        raise ValueError(f"prompt_id_lists[{empty}] is empty; expected at least one token")
    eos_token_id, pad_token_id = _special_ids(tokenizer)
    generation_config = _generation_config(cfg, eos_token_id, pad_token_id)
    order = sorted(range(len(prompt_id_lists)), key=lambda i: len(prompt_id_lists[i]))
    responses: list[str] = [""] * len(prompt_id_lists)
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
            new_token_ids = output_ids[:, prompt_ids.shape[1]:].tolist()
            for row, token_ids in zip(batch_rows, new_token_ids):
                text = tokenizer.decode(_until_eos(token_ids, eos_token_id), skip_special_tokens=True)
                responses[row] = text.strip()
    return responses


@dataclass
class EvalResult:
    """Scores (x 100) of one model under one protocol; ``*_std`` is the population std over seeds.

    ``answers``: ``{"prompt", "prediction", "references"}`` per example, from the first seed.
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

    def to_dict(self, include_answers: bool = True) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not include_answers:
            del data["answers"]
        return data


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def evaluate(model, tokenizer, examples: Sequence[TokenizedExample],
             references: Sequence[Sequence[str]], cfg: EvalConfig,
             generate: Callable[[list[list[int]], int], list[str]] | None = None) -> EvalResult:
    """Generate for every example under each seed of ``cfg`` and score against ``references``
    (one non-empty list of reference strings per example). ``generate(prompt id lists, seed)``
    replaces :func:`generate_responses` on ``model`` (e.g. generation on the rollout workers)."""
    if len(references) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(references)} reference lists; "
                         "expected one list of reference strings per example")
    prompt_id_lists = [example.prompt_ids for example in examples]
    rouge_per_seed, exact_per_seed = [], []
    first_predictions: list[str] = []
    for seed in cfg.seeds:
        predictions = generate(prompt_id_lists, seed) if generate is not None \
            else generate_responses(model, tokenizer, prompt_id_lists, cfg, seed)
        rouge_per_seed.append(_mean(rouge_l_scores(predictions, references)))
        exact_per_seed.append(_mean(exact_match_scores(predictions, references)))
        if not first_predictions:
            first_predictions = predictions
    answers = [
        {"prompt": tokenizer.decode(example.prompt_ids, skip_special_tokens=True),
         "prediction": prediction, "references": list(refs)}
        for example, prediction, refs in zip(examples, first_predictions, references)
    ]
    return EvalResult(
        protocol=cfg.protocol, num_examples=len(examples),
        rouge_l=_mean(rouge_per_seed), rouge_l_std=statistics.pstdev(rouge_per_seed),
        rouge_l_per_seed=rouge_per_seed,
        exact_match=_mean(exact_per_seed), exact_match_std=statistics.pstdev(exact_per_seed),
        exact_match_per_seed=exact_per_seed,
        settings=dataclasses.asdict(cfg), answers=answers,
    )


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

    table = markdown_table([result_row(result, name)], RESULT_COLUMNS)
    write_atomic(out_dir / "answers.jsonl", write_answers)
    write_atomic(out_dir / "results.md", lambda file: file.write(f"# Evaluation: {name}\n\n{table}"))
    write_atomic(out_dir / "results.json", write_results)
    return out_dir


def evaluate_on_data(model_source: str, data_source: str, out_dir: str | os.PathLike, cfg: EvalConfig,
                     template: str = "minillm", max_prompt_tokens: int = 256, num_examples: int | None = None,
                     split: str = "test", dtype: str = "float32", device: str = "auto",
                     gguf_file: str | None = None) -> EvalResult:
    """``minillm-rl eval``: load a model (an HF directory, a hub name, or ``gguf_file`` in the
    ``model_source`` directory) in ``dtype`` on ``device`` and instruction data, evaluate, write
    the result files.

    References are the data's responses, untruncated; prompts over ``max_prompt_tokens`` are
    dropped (and counted in ``results.json`` under ``settings.preparation``).
    """
    from minillm_rl.data import load_instructions, tokenize_examples
    from minillm_rl.models import load_causal_lm, load_tokenizer, resolve_device, torch_dtype

    target_dtype, target_device = torch_dtype(dtype), resolve_device(device)
    tokenizer = load_tokenizer(model_source, gguf_file=gguf_file)
    model = load_causal_lm(model_source, dtype=target_dtype, gguf_file=gguf_file).to(target_device)
    loaded = load_instructions(data_source, split=split, max_examples=num_examples)
    by_source = {example.source: example for example in loaded.examples}
    examples, counts = tokenize_examples(loaded.examples, tokenizer, max_prompt_tokens, cfg.max_new_tokens, template)
    if not examples:
        raise ValueError(f"{data_source}: no example has a prompt within {max_prompt_tokens} tokens")
    references = [[by_source[example.source].response] for example in examples]
    result = evaluate(model, tokenizer, examples, references, cfg)
    result.settings["preparation"] = dataclasses.asdict(counts)
    result.settings["model"] = {"source": str(model_source), "gguf_file": gguf_file, "dtype": dtype,
                                "device": str(target_device)}
    write_eval_outputs(result, out_dir, name=str(model_source))
    return result
