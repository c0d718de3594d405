"""``minillm-rl report``: one comparison table and training curves from several run directories.

A run directory is recognised by what it holds:

- ``minillm-rl train``: ``config.yaml`` + ``metrics.jsonl`` (+ ``best.json``); its test scores
  are ``eval/results.json`` when ``minillm-rl eval --out RUN/eval`` was run on it. One row, named
  after its method (``train.phases``: SFT, KD, SeqKD, MiniLLM).
- ``minillm-rl eval``: ``results.json`` alone. One row, named after the directory.

``NAME=DIR`` names a row explicitly; rows with the same name (e.g. one method, three training
seeds) are merged: their test Rouge-L is the mean over runs, ± the std over runs (one run: ± the
std over its evaluation seeds).

Runs whose results carry per-prompt values (``minillm-rl eval`` and a train run's test stage,
:mod:`~minillm_rl.runtime.test_stage`) also get the metrics table (every metric of ``protocol.METRICS``, mean and
bootstrap interval over prompts per name) and paired differences of each name against a baseline
name (``--baseline``; default: the first name), each with a paired bootstrap interval over the
same prompts. Runs of one name are averaged prompt by prompt first, so these intervals are over
prompts only (the spread over training runs is the ± of the first table). The runs must have
been evaluated on the same prompts in the same order; otherwise the report is refused.
"""

from __future__ import annotations

import io
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from minillm_rl.evaluation.protocol import METRICS, interval_cell, markdown_table
from minillm_rl.evaluation.stats import BootstrapConfig, bootstrap_mean, paired_difference
from minillm_rl.tracking import atomic_write_text, write_atomic

METHOD_NAMES = {"sft": "SFT", "kd": "KD", "seqkd": "SeqKD", "minillm": "MiniLLM"}
TABLE_COLUMNS = ("model", "test Rouge-L", "exact match", "test runs × seeds", "best valid Rouge-L", "best step",
                 "checkpoint", "run dir")
# (title, metrics.jsonl key) of each curve panel; the keys the MiniLLM loop and SFT loops log.
CURVE_PANELS = (("reward (mean per token)", "reward/mean"), ("reverse KL per token", "reverse_kl/per_token"),
                ("validation Rouge-L", "validation_rouge_l"), ("response length (tokens)", "response_len/mean"))
CURVE_LINE_STYLES = ("-", "--", ":", "-.")
CURVES_FILE = "curves.png"
REPORT_FILE = "report.md"


@dataclass
class ModelScores:
    """What one run says about one model; ``test_rouge_l_per_seed`` is empty without test results."""

    name: str
    run_dir: str
    checkpoint: str = ""
    test_rouge_l_per_seed: list[float] = field(default_factory=list)
    exact_match: float | None = None
    best_validation_rouge_l: float | None = None
    best_step: int | None = None
    prompt_keys: list[str] = field(default_factory=list)
    per_prompt: dict[str, list[float | None]] = field(default_factory=dict)
    phases: list[str] = field(default_factory=list)  # a train run's train.phases
    started_from: str = ""  # a train run's: the weights its last phase started from


@dataclass
class RunCurves:
    """``{stage: {key: [(step, value), ...]}}`` of one run's ``metrics.jsonl`` (last value per step)."""

    label: str
    series: dict[str, dict[str, list[tuple[int, float]]]]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: corrupt ({type(err).__name__}: {err}); expected JSON") from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; an unterminated last line (a killed writer) is ignored."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: cut mid-write
                break
            raise ValueError(f"{path}:{number}: malformed JSON ({err.msg}); expected one metrics record per line") \
                from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or "stage" not in record:
            raise ValueError(f"{path}:{number}: expected an object with 'stage' and an integer 'step'")
        records.append(record)
    return records


def metric_series(records: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Numeric values by stage and key, sorted by step; a step logged twice (a resumed run
    repeats the steps after its checkpoint) keeps its last value."""
    by_step: dict[str, dict[str, dict[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key in ("stage", "step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            by_step.setdefault(record["stage"], {}).setdefault(key, {})[record["step"]] = float(value)
    return {stage: {key: sorted(values.items()) for key, values in keys.items()} for stage, keys in by_step.items()}


def _best_from_metrics(series: dict[str, dict[str, list[tuple[int, float]]]], stage: str) -> tuple[float, int] | None:
    points = series.get(stage, {}).get("validation_rouge_l", [])
    if not points:
        return None
    step, score = max(points, key=lambda point: (point[1], -point[0]))
    return score, step


def _eval_scores(results: dict[str, Any], path: Path) -> tuple[list[float], float]:
    """``(rouge_l_per_seed, exact_match)`` of a ``minillm-rl eval`` results.json."""
    per_seed = results.get("rouge_l_per_seed") or ([results["rouge_l"]] if "rouge_l" in results else None)
    if not per_seed or "exact_match" not in results:
        raise ValueError(f"{path}: no 'rouge_l_per_seed'/'exact_match'; expected the results.json of `minillm-rl eval`")
    return [float(v) for v in per_seed], float(results["exact_match"])


def _per_prompt_values(results: dict[str, Any], path: Path) -> tuple[list[str], dict[str, list[float | None]]]:
    """``(prompt_keys, per_prompt)`` of an eval result (both empty when it has none)."""
    keys, per_prompt = results.get("prompt_keys") or [], results.get("per_prompt") or {}
    if not isinstance(keys, list) or not isinstance(per_prompt, dict):
        raise ValueError(f"{path}: 'prompt_keys' / 'per_prompt' are not a list / an object; expected the "
                         "results.json of `minillm-rl eval`")
    for key, values in per_prompt.items():
        if not isinstance(values, list) or len(values) != len(keys) or \
                not all(v is None or isinstance(v, (int, float)) for v in values):
            raise ValueError(f"{path}: per_prompt[{key!r}] is not {len(keys)} numbers (or null), one per "
                             "prompt_keys entry; expected the results.json of `minillm-rl eval`")
    return keys, {key: values for key, values in per_prompt.items() if key in METRICS}


def _train_run(run_dir: Path, name: str | None) -> ModelScores:
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    phases = (config.get("train") or {}).get("phases") or []
    if not phases:
        raise ValueError(f"{run_dir / 'config.yaml'}: no train.phases; expected the config of `minillm-rl train`")
    scores = ModelScores(name or METHOD_NAMES.get(phases[-1], phases[-1]), str(run_dir))
    if (run_dir / "best").is_dir():
        scores.checkpoint = str(run_dir / "best")
    scores.phases = list(phases)
    scores.started_from = str(run_dir / "sft_best_loss") if _starts_from_sft(phases) else \
        str((config.get("model") or {}).get("student", ""))
    best = run_dir / "best.json"
    if best.is_file():
        payload = _read_json(best)
        scores.best_validation_rouge_l, scores.best_step = payload["validation_rouge_l"], payload["step"]
    else:
        found = _best_from_metrics(metric_series(read_metrics(run_dir / "metrics.jsonl")), phases[-1])
        if found:
            scores.best_validation_rouge_l, scores.best_step = found
    test = run_dir / "eval" / "results.json"
    if test.is_file():
        results = _read_json(test)
        scores.test_rouge_l_per_seed, scores.exact_match = _eval_scores(results, test)
        scores.prompt_keys, scores.per_prompt = _per_prompt_values(results, test)
    return scores


def _starts_from_sft(phases: list[str]) -> bool:
    """A minillm phase after an sft phase starts from the lowest-validation-loss SFT weights
    (``sft_best_loss/``, ``TrainingRun.build_phase_engine``), not from the SFT phase's best Rouge-L;
    every other phase starts from ``model.student``."""
    return phases[-1] == "minillm" and "sft" in phases[:-1]


def checkpoint_notes(models: Sequence[ModelScores]) -> list[str]:
    """What each train run's row is (``best/``: the best validation Rouge-L of its last phase) and
    what that phase started from; plus a warning when an SFT run's row is compared with a later
    phase that did not start from it (it started from the lowest-loss SFT weights)."""
    notes = []
    for model in models:
        if not model.phases:
            continue
        start = "" if model.phases == ["sft"] else f", which started from {model.started_from}"
        notes.append(f"{model.name} ({model.run_dir}): best/ = the best validation Rouge-L of its {model.phases[-1]} "
                     f"phase{start}")
    sft_rows = [model.name for model in models if model.phases == ["sft"]]
    after_sft = [model.name for model in models if model.phases and _starts_from_sft(model.phases)]
    if sft_rows and after_sft:
        notes.append(f"the {', '.join(sft_rows)} row is not the model {', '.join(after_sft)} started from (the "
                     "lowest-validation-loss SFT weights, sft_best_loss/): for that baseline, report the SFT init its "
                     "run's test stage evaluated, as `\"SFT init=RUN/test/sft\"`")
    return list(dict.fromkeys(notes))


def parse_run_argument(argument: str) -> tuple[str | None, Path]:
    """``"NAME=DIR"`` -> ``(NAME, DIR)``; ``"DIR"`` -> ``(None, DIR)`` (a ``=`` inside an existing
    path is part of the path)."""
    name, sep, rest = argument.partition("=")
    if sep and name and not Path(argument).exists():
        return name, Path(rest)
    return None, Path(argument)


def read_run(argument: str) -> tuple[list[ModelScores], RunCurves | None]:
    """The model rows and curves of one run directory (see the module docstring)."""
    name, run_dir = parse_run_argument(argument)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: not a directory; expected a run directory of `minillm-rl train` "
                         "or `minillm-rl eval`")
    metrics, results_path = run_dir / "metrics.jsonl", run_dir / "results.json"
    curves = None
    if metrics.is_file():
        curves = RunCurves(name or run_dir.name, metric_series(read_metrics(metrics)))
    if (run_dir / "config.yaml").is_file():
        if curves is None:
            raise ValueError(f"{run_dir}: no metrics.jsonl; expected a `minillm-rl train` run that has logged steps")
        return [_train_run(run_dir, name)], curves
    if results_path.is_file():
        results = _read_json(results_path)
        per_seed, exact = _eval_scores(results, results_path)
        keys, per_prompt = _per_prompt_values(results, results_path)
        return [ModelScores(name or run_dir.name, str(run_dir), str(results.get("model", "")), per_seed, exact,
                            prompt_keys=keys, per_prompt=per_prompt)], None
    raise ValueError(f"{run_dir}: no metrics.jsonl or results.json; expected a run directory of `minillm-rl "
                     "train` or `minillm-rl eval`")


def _mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.pstdev(values):.2f}"


def table_rows(models: Sequence[ModelScores]) -> list[dict[str, Any]]:
    """One row per model name (first-appearance order), runs of the same name merged."""
    groups: dict[str, list[ModelScores]] = {}
    for model in models:
        groups.setdefault(model.name, []).append(model)
    rows = []
    for name, runs in groups.items():
        tested = [run for run in runs if run.test_rouge_l_per_seed]
        row: dict[str, Any] = {"model": name, "run dir": ", ".join(dict.fromkeys(run.run_dir for run in runs)),
                               "checkpoint": ", ".join(run.checkpoint for run in runs if run.checkpoint)}
        if len(tested) == 1:
            row["test Rouge-L"] = _mean_std(tested[0].test_rouge_l_per_seed)
        elif tested:
            row["test Rouge-L"] = _mean_std([statistics.fmean(run.test_rouge_l_per_seed) for run in tested])
        if tested:
            row["exact match"] = statistics.fmean(run.exact_match for run in tested)
            row["test runs × seeds"] = f"{len(tested)} × {len(tested[0].test_rouge_l_per_seed)}"
        validated = [run for run in runs if run.best_validation_rouge_l is not None]
        if validated:
            best = max(validated, key=lambda run: run.best_validation_rouge_l)
            row["best valid Rouge-L"] = float(best.best_validation_rouge_l)
            row["best step"] = best.best_step
        rows.append(row)
    return rows


def _mean_over_runs(columns: list[list[float | None]]) -> list[float | None]:
    """Each prompt's mean over the runs that define it (``None`` where none does)."""
    merged = []
    for values in zip(*columns):
        defined = [v for v in values if v is not None]
        merged.append(sum(defined) / len(defined) if defined else None)
    return merged


def metric_tables(models: Sequence[ModelScores], baseline: str | None = None,
                  bootstrap: BootstrapConfig = BootstrapConfig()) -> tuple[str, str]:
    """``(metrics table, differences table)`` of the models with per-prompt values (see the module
    docstring); both empty when there is none. Rows: metrics; columns: names, then ``NAME − BASELINE``."""
    scored = [model for model in models if model.per_prompt]
    if not scored:
        if baseline is not None:
            raise ValueError(f"--baseline {baseline}: no run has per-prompt metrics; expected eval results "
                             "written by this version of `minillm-rl eval`")
        return "", ""
    first = scored[0]
    for model in scored[1:]:
        if model.prompt_keys != first.prompt_keys:
            where = next((i for i, (a, b) in enumerate(zip(model.prompt_keys, first.prompt_keys)) if a != b), None)
            detail = f"first difference at prompt {where}" if where is not None else "one list is a prefix of the other"
            raise ValueError(f"{model.run_dir}: its {len(model.prompt_keys)} evaluated prompts differ from the "
                             f"{len(first.prompt_keys)} of {first.run_dir} ({detail}); expected every run evaluated "
                             "on the same held-out prompts in the same order")
    groups: dict[str, list[ModelScores]] = {}
    for model in scored:
        groups.setdefault(model.name, []).append(model)
    merged = {name: {key: _mean_over_runs([run.per_prompt[key] for run in runs if key in run.per_prompt])
                     for key in METRICS if any(key in run.per_prompt for run in runs)}
              for name, runs in groups.items()}
    names = list(merged)
    base = names[0] if baseline is None else baseline
    if base not in merged:
        raise ValueError(f"--baseline {base}: no run of that name has per-prompt metrics; expected one of {names}")
    keys = [key for key in METRICS if any(key in values for values in merged.values())]
    rows = [{"metric": METRICS[key], **{name: interval_cell(bootstrap_mean(merged[name][key], bootstrap).to_dict())
                                        for name in names if key in merged[name]}} for key in keys]
    others = [name for name in names if name != base]
    differences = [{"metric": METRICS[key], **{
        f"{name} − {base}": interval_cell(paired_difference(merged[name][key], merged[base][key], bootstrap).to_dict())
        for name in others if key in merged[name] and key in merged[base]}} for key in keys]
    return (markdown_table(rows, ("metric", *names)),
            markdown_table(differences, ("metric", *(f"{name} − {base}" for name in others))) if others else "")


def plot_curves(curves: Sequence[RunCurves], path: str | os.PathLike) -> Path:
    """One PNG with a panel per :data:`CURVE_PANELS` entry, one line per (run, stage) that logged
    it; written atomically."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the curves need matplotlib; install it with `pip install -e .[demo]`") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    for axis, (title, key) in zip(axes.flat, CURVE_PANELS):
        for index, run in enumerate(curves):
            for stage, keys in run.series.items():
                points = keys.get(key)
                if points:
                    steps, values = zip(*points)
                    # A line style per run, so a run whose curve equals another's is not hidden under it.
                    axis.plot(steps, values, marker="." if len(points) < 30 else None,
                              linestyle=CURVE_LINE_STYLES[index % len(CURVE_LINE_STYLES)],
                              label=f"{run.label} ({stage})")
        axis.set_title(title)
        axis.set_xlabel("optimizer step of the phase")
        if axis.lines:
            axis.legend(fontsize="small" if len(axis.lines) <= 6 else "x-small")
        else:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_atomic(path, lambda file: file.write(buffer.getvalue()), binary=True)
    return Path(path)


@dataclass
class Report:
    table: str
    report_path: Path
    curves_path: Path | None
    rows: list[dict[str, Any]]
    metrics_table: str = ""
    differences_table: str = ""


def build_report(run_arguments: Sequence[str], out_dir: str | os.PathLike, title: str = "minillm_rl report",
                 baseline: str | None = None, bootstrap: BootstrapConfig = BootstrapConfig()) -> Report:
    """Read every run (``DIR`` or ``NAME=DIR``), write ``report.md`` and ``curves.png`` into
    ``out_dir``; nothing is written when a run cannot be read or the runs' prompts differ.
    ``baseline``: the name the paired differences are taken against (default: the first name)."""
    if not run_arguments:
        raise ValueError("report: expected at least one run directory")
    models, curves = [], []
    for argument in run_arguments:
        run_models, run_curves = read_run(argument)
        models.extend(run_models)
        if run_curves is not None:
            curves.append(run_curves)
    rows = table_rows(models)
    table = markdown_table(rows, TABLE_COLUMNS)
    metrics, differences = metric_tables(models, baseline, bootstrap)
    out_dir = Path(out_dir)
    curves_path = plot_curves(curves, out_dir / CURVES_FILE) if curves else None
    notes = ["Test Rouge-L: mean ± std over training runs of one name (one run: over its evaluation seeds); "
             "runs × seeds says which. Best valid Rouge-L: the checkpoint-selection protocol (one sample per "
             "prompt at the training sampling settings), step of the selected checkpoint."]
    sections = [f"# {title}\n\n{table}"]
    if metrics:
        num_prompts = len(next(model.prompt_keys for model in models if model.per_prompt))
        sections.append(f"## Distillation metrics\n\n{metrics}")
        if differences:
            sections.append(f"## Paired differences\n\n{differences}")
        notes.append(f"Distillation metrics: mean [{100 * bootstrap.confidence:g} % interval] over {num_prompts} "
                     f"prompts, percentile bootstrap ({bootstrap.resamples} resamples, seed {bootstrap.seed}); the "
                     "runs of one name are averaged prompt by prompt first, so the intervals are over prompts "
                     "only. Paired differences: per prompt, then the same bootstrap over prompts.")
    described = checkpoint_notes(models)
    if described:
        notes.append("Checkpoints: " + "; ".join(described) + ".")
    notes.append(f"Training curves: `{curves_path.name}`." if curves_path is not None else
                 "No training curves: none of the directories is a `minillm-rl train` run (metrics.jsonl).")
    report_path = out_dir / REPORT_FILE
    atomic_write_text(report_path, "\n".join(sections) + "\n" + "\n\n".join(notes) + "\n")
    return Report(table, report_path, curves_path, rows, metrics, differences)
