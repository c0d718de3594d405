"""The run's test stage (rank 0, after the last phase): the selected student against the teacher
and the SFT init on held-out prompts, side by side.

Runs when the recipe names test prompts (``eval.num_test`` held out of ``data.train``, or
``eval.test_data``). Every model is evaluated with
:func:`~minillm_rl.evaluation.protocol.evaluate_models` under the test protocol (temperature 1,
``eval.no_repeat_ngram_size``, ``eval.test_seeds`` seeds) with the distillation metrics against
the teacher. Files, all in the run directory:

- ``eval/`` — ``best/``'s evaluation (where ``minillm-rl report`` looks for a train run's test
  scores); ``test/teacher/``, ``test/sft/`` — the other models';
- ``report.md`` + ``curves.png`` — :func:`~minillm_rl.evaluation.report.build_report` of them
  (Rouge-L table, distillation metrics with intervals, paired differences against the SFT init);
- ``results.md`` — that report, then ``eval.side_by_side`` test prompts with every model's answer
  next to each other; ``answers.jsonl`` — every test prompt with every model's first-seed answer;
  ``results.json`` — the scores per model.

The models are loaded in this process, on a GPU when one is visible: for students and teachers
that fit next to each other. At scale, evaluate ``best/`` as its own stage (``minillm-rl eval``, as
``minillm-rl plan --eval-split`` does).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minillm_rl.config import RunConfig
from minillm_rl.evaluation.protocol import EvalConfig, EvalResult, evaluate_models, write_eval_outputs
from minillm_rl.evaluation.report import METHOD_NAMES, build_report
from minillm_rl.models import load_causal_lm
from minillm_rl.runtime.inputs import RunInputs
from minillm_rl.tracking import atomic_write_json, atomic_write_text, log_line

TEST_RESULTS_FILE = "results.json"  # written last: the test stage finished


def held_out_protocol(cfg: RunConfig) -> EvalConfig:
    """The spec's test protocol with the recipe's ``eval`` settings (seeds 10, 20, ...)."""
    seeds = tuple(10 * (i + 1) for i in range(cfg.eval.test_seeds))
    return EvalConfig(seeds=seeds, no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size,
                      max_new_tokens=cfg.eval.max_new_tokens)


def models_to_test(cfg: RunConfig, out: Path) -> list[tuple[str, str, Path]]:
    """``(name, source, result directory)`` of each model, the run's own result last."""
    phases = cfg.train.phases
    models = []
    if "teacher" in cfg.eval.compare and cfg.model.teacher:
        models.append(("teacher", cfg.model.teacher, out / "test" / "teacher"))
    if "sft" in cfg.eval.compare and "sft" in phases and phases[-1] != "sft":
        models.append(("SFT init", str(out / "sft_best_loss"), out / "test" / "sft"))
    models.append((METHOD_NAMES[phases[-1]], str(out / "best"), out / "eval"))
    return models


def _side_by_side(results: dict[str, EvalResult], references: list[list[str]], count: int) -> str:
    """``count`` prompts, each with the reference and every model's first-seed answer."""
    first = next(iter(results.values()))
    sections = []
    for index, answer in enumerate(first.answers[:count]):
        rows = [("reference", references[index][0])] + [(name, result.answers[index]["prediction"])
                                                          for name, result in results.items()]
        lines = [f"### Prompt {index + 1}\n", "```text", answer["prompt"].strip(), "```\n",
                 "| model | answer |", "|---|---|"]
        lines += [f"| {name} | {' '.join(text.split()).replace('|', chr(92) + '|') or '(empty)'} |"
                  for name, text in rows]
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def run_test_stage(cfg: RunConfig, inputs: RunInputs) -> Path:
    """Evaluate, write the files listed in the module docstring; returns ``results.md``'s path."""
    out = Path(cfg.output.dir)
    protocol = held_out_protocol(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.model.dtype)
    teacher = load_causal_lm(cfg.model.teacher, dtype=dtype, gguf_file=cfg.model.teacher_gguf_file).to(device) \
        if cfg.model.teacher else None
    teacher_samples: dict = {}  # the teacher's answers per seed, sampled once for every student
    results: dict[str, EvalResult] = {}
    for name, source, result_dir in models_to_test(cfg, out):
        log_line(f"test: {name} ({source}) on {len(inputs.test_examples)} held-out prompts, "
                 f"seeds {list(protocol.seeds)}")
        is_teacher = name == "teacher"
        model = teacher if is_teacher else load_causal_lm(source, dtype=dtype).to(device)
        result = evaluate_models(model, inputs.tokenizer, inputs.test_examples, inputs.test_references, protocol,
                                 teacher=None if is_teacher else teacher, teacher_samples=teacher_samples)
        result.settings["model"] = {"source": source, "dtype": cfg.model.dtype, "device": str(device)}
        write_eval_outputs(result, result_dir, name=name)
        results[name] = result
        log_line(f"test: {name} Rouge-L {result.rouge_l:.2f}" + (
            f", reverse KL/token {result.metrics['reverse_kl']['mean']:.3f}" if "reverse_kl" in result.metrics else ""))
    names = list(results)
    runs = [f"{name}={result_dir}" for name, _, result_dir in models_to_test(cfg, out)[:-1]] + [f"{names[-1]}={out}"]
    report = build_report(runs, out, title=f"{out.name}: test", baseline="SFT init" if "SFT init" in names else None)
    report_text = report.report_path.read_text(encoding="utf-8")
    side = _side_by_side(results, inputs.test_references, cfg.eval.side_by_side)
    atomic_write_text(out / "results.md", f"{report_text}\n## Answers side by side (seed {protocol.seeds[0]})\n\n"
                      f"{side}\nAll answers: `answers.jsonl`; per model: `eval/`, `test/*/`.\n")
    atomic_write_text(out / "answers.jsonl", "".join(json.dumps(
        {"prompt": results[names[0]].answers[i]["prompt"], "reference": inputs.test_references[i][0],
         **{name: result.answers[i]["prediction"] for name, result in results.items()}}, ensure_ascii=False) + "\n"
        for i in range(len(inputs.test_examples))))
    atomic_write_json(out / TEST_RESULTS_FILE, {
        "protocol": {"seeds": list(protocol.seeds), "temperature": protocol.temperature,
                     "no_repeat_ngram_size": protocol.no_repeat_ngram_size,
                     "max_new_tokens": protocol.max_new_tokens, "num_prompts": len(inputs.test_examples)},
        "models": [{"name": name, "source": source, "dir": str(result_dir), "rouge_l": results[name].rouge_l,
                    "metrics": results[name].metrics} for name, source, result_dir in models_to_test(cfg, out)],
    })
    return out / "results.md"
