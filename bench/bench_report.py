"""The benchmark tables from the committed unit result files alone (``make bench-report``).

Reads ``<results>/quality/<size>/...`` (written by ``bench/bench_quality.py``, one file per unit)
and writes ``docs/results/bench-quality.md`` (``--out``) plus, per (size, table), a PNG of the headline
metrics (``bench-quality-<size>-<table>.png``: each row's mean and 95 % interval over prompts, and
each training seed's mean) and of the training curves of each method's first seed
(``...-curves.png``), next to it. No checkpoint or model is read.

The statistics are the project's (:mod:`minillm_rl.evaluation.report`): per row, the test Rouge-L
mean ± std over training seeds; every distillation metric's mean and percentile bootstrap interval
over prompts (a row's seeds averaged prompt by prompt first); paired differences against SFT (the
ablation table: against MiniLLM). While a row holds fewer training seeds than the baseline's, it is
also compared with the baseline on its own seeds only: seeds differ by more than the noise of one
run (MiniLLM's reverse KL per seed here: 0.934, 0.940, 0.903), so a partly filled row against the
baseline's every seed would mix a seed's effect into the method's. The ablation table also pairs
the paper's single-step comparison directly (decomposed − without the single-step term, on the
seeds both hold). The bootstrap seed is fixed, so the same result files give
byte-identical output. Every row says how many training seeds (and which) it holds. A result file
that cannot be read is one error line, exit 2, nothing written.

    python bench/bench_report.py [--results bench/results] [--out docs/results/bench-quality.md]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402

from bench_quality import METHODS, SFT_INIT, SINGLE_STEP_PAIR, TABLES  # noqa: E402
from minillm_rl.evaluation.protocol import METRICS, markdown_table  # noqa: E402
from minillm_rl.evaluation.report import (  # noqa: E402
    ModelScores,
    RunCurves,
    _eval_scores,
    _mean_over_runs,
    _per_prompt_values,
    metric_tables,
    plot_curves,
    table_rows,
)
from minillm_rl.evaluation.stats import BootstrapConfig, as_array, bootstrap_mean  # noqa: E402
from minillm_rl.tracking import atomic_write_text, write_atomic  # noqa: E402
from quality_units import healed_nll  # noqa: E402
from units import RESULTS, read_result  # noqa: E402

TEACHER = "teacher"
BOOTSTRAP = BootstrapConfig()  # the project's defaults: fixed seed, so the output is reproducible
# The plot's panels: the metrics the paper's claims are about.
PLOTTED = ("reverse_kl", "teacher_nll", "rouge_l", "student_nll_reference")
COLUMNS = ("model", "training seeds", "test Rouge-L", "exact match", "test runs × seeds", "best valid Rouge-L",
           "best step")


@dataclass
class Row:
    """One table row: its label, the training seeds it holds and one :class:`ModelScores` per result
    file (a seed of a method; the teacher: a test seed), plus the curves of its first seed."""

    label: str
    seeds: list[int]
    scores: list[ModelScores]
    curves: RunCurves | None = None
    starts: dict[int, str] = field(default_factory=dict)  # seed -> the SFT-init weights it started from
    prefix: str = ""  # its result directory (bench_quality.METHODS); the teacher's: empty

    def on_seeds(self, seeds: tuple[int, ...]) -> tuple[str, list[ModelScores]]:
        """``(label, runs)``: this row's runs of ``seeds`` only, named for them."""
        label = f"{self.label.rsplit(' (', 1)[0]} ({seeds_text(seeds)})"
        return label, [replace(scores, name=label) for seed, scores in zip(self.seeds, self.scores) if seed in seeds]


def seeds_text(seeds: tuple[int, ...]) -> str:
    """``"seed 2"`` / ``"seeds 2, 3"``."""
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def _result_files(directory: Path, prefix: str) -> list[tuple[int, Path]]:
    """``[(seed, path)]`` of ``directory/<prefix><seed>.json``, by seed."""
    found = []
    for path in directory.glob(f"{prefix}*.json"):
        seed = path.stem[len(prefix):]
        if seed.isdigit():
            found.append((int(seed), path))
    return sorted(found)


def _scores(label: str, path: Path, unit: str) -> tuple[ModelScores, dict]:
    """The result file at ``path`` (it must be unit ``unit`` with a test) as report scores."""
    result = read_result(path)
    if result.get("unit") != unit:
        raise ValueError(f"{path}: holds unit {result.get('unit')!r}; expected {unit!r} (a result file renamed "
                         "or copied to the wrong place)")
    if not isinstance(result.get("test"), dict):
        raise ValueError(f"{path}: no 'test' object; expected a unit with its test evaluation")
    per_seed, exact = _eval_scores(result["test"], path)
    keys, per_prompt = _per_prompt_values(result["test"], path)
    # best.json's step and validation Rouge-L describe the tested checkpoint only when it is best/.
    best = (result.get("training") or {}).get("best") or {} if result.get("tested_checkpoint") == "best" else {}
    return ModelScores(label, str(path), test_rouge_l_per_seed=per_seed, exact_match=exact,
                       best_validation_rouge_l=best.get("validation_rouge_l"), best_step=best.get("step"),
                       prompt_keys=keys, per_prompt=per_prompt), result


def read_rows(size_dir: Path, table: str) -> list[Row]:
    """The teacher's row, the SFT init's (MiniLLM's start; both tables), and one row per method of
    ``table``, each with at least one result file."""
    rows = []
    teacher = _result_files(size_dir / TEACHER, "test-seed")
    if teacher:
        rows.append(Row(TEACHER, [], [_scores(TEACHER, path, f"{TEACHER}/{path.stem}")[0] for _, path in teacher]))
    for name, prefix, _, tables in ((SFT_INIT, "sft-init", (), TABLES), *METHODS):
        files = _result_files(size_dir / prefix, "seed")
        if table not in tables or not files:
            continue
        label = f"{name} ({len(files)} seed{'s' if len(files) > 1 else ''})"
        loaded = [_scores(label, path, f"{prefix}/{path.stem}") for _, path in files]
        series = (loaded[0][1].get("training") or {}).get("curves") or {}
        starts = {seed: json.dumps(result["init"]["weights"], sort_keys=True)
                  for (seed, _), (_, result) in zip(files, loaded) if isinstance(result.get("init"), dict)}
        rows.append(Row(label, [seed for seed, _ in files], [scores for scores, _ in loaded],
                        RunCurves(f"{name} seed {files[0][0]}", series), starts, prefix))
    return rows


def mixed_starts(rows: list[Row]) -> list[int]:
    """The training seeds whose MiniLLM rows started from different SFT-init weights (the init was
    trained again after some of them finished: its checkpoint was lost), so a seed's variants differ
    in more than their switch."""
    by_seed: dict[int, set[str]] = {}
    for row in rows:
        for seed, weights in row.starts.items():
            by_seed.setdefault(seed, set()).add(weights)
    return sorted(seed for seed, weights in by_seed.items() if len(weights) > 1)


def same_seed_differences(rows: list[Row], baseline: Row) -> list[tuple[str, str]]:
    """``[(baseline label on those seeds, differences table)]``, one per set of training seeds that
    some rows hold and the baseline holds more than: those rows against the baseline's runs of the
    same seeds (paired by prompt, as the full table)."""
    by_seeds: dict[tuple[int, ...], list[Row]] = {}
    for row in rows:
        seeds = tuple(row.seeds)
        if row is not baseline and seeds and set(seeds) < set(baseline.seeds):
            by_seeds.setdefault(seeds, []).append(row)
    tables = []
    for seeds, same in by_seeds.items():
        label, runs = baseline.on_seeds(seeds)
        _, differences = metric_tables([*runs, *(scores for row in same for scores in row.scores)], label, BOOTSTRAP)
        tables.append((label, differences))
    return tables


def single_step_pair(rows: list[Row]) -> tuple[str, str] | None:
    """``(heading, differences table)`` of :data:`SINGLE_STEP_PAIR` on the training seeds both rows
    hold (``None`` without such a seed)."""
    by_prefix = {row.prefix: row for row in rows}
    if not all(prefix in by_prefix for prefix in SINGLE_STEP_PAIR):
        return None
    with_term, without = (by_prefix[prefix] for prefix in SINGLE_STEP_PAIR)
    seeds = tuple(seed for seed in with_term.seeds if seed in without.seeds)
    if not seeds:
        return None
    (_, with_runs), (label, without_runs) = with_term.on_seeds(seeds), without.on_seeds(seeds)
    _, differences = metric_tables([*with_runs, *without_runs], label, BOOTSTRAP)
    return f"the paper's single-step comparison, on training {seeds_text(seeds)}", differences


def summary_table(rows: list[Row]) -> str:
    """:func:`~minillm_rl.evaluation.report.table_rows` with the training seeds of each row."""
    cells = table_rows([scores for row in rows for scores in row.scores])
    for cell, row in zip(cells, rows):
        cell["training seeds"] = f"{len(row.seeds)} ({', '.join(map(str, row.seeds))})" if row.seeds else "—"
    return markdown_table(cells, COLUMNS)


def plot_metrics(rows: list[Row], path: Path) -> None:
    """One panel per :data:`PLOTTED` metric: per row, the mean with its 95 % bootstrap interval over
    prompts (seeds averaged prompt by prompt, as in the table) and each training seed's mean."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 4.8))
    for axis, key in zip(axes, PLOTTED):
        for x, row in enumerate(rows):
            columns = [scores.per_prompt[key] for scores in row.scores if key in scores.per_prompt]
            if not columns:
                continue
            interval = bootstrap_mean(_mean_over_runs(columns), BOOTSTRAP)
            axis.errorbar([x], [interval.mean], yerr=[[interval.mean - interval.low], [interval.high - interval.mean]],
                          fmt="o", capsize=4, color="black")
            if row.seeds:
                seed_means = [np.nanmean(as_array(column)) for column in columns]
                axis.plot([x] * len(columns), seed_means, "x", color="tab:blue")
        axis.set_xticks(range(len(rows)), [row.label for row in rows], rotation=35, ha="right", fontsize="small")
        axis.set_title(METRICS[key], fontsize="medium")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    plt.close(figure)
    write_atomic(path, lambda file: file.write(buffer.getvalue()), binary=True)


def provenance(paths: list[Path]) -> str:
    """Commits, machines and summed wall time of the result files."""
    results = [read_result(path) for path in paths]
    commits = sorted({(r["provenance"].get("commit") or "?")[:10] + ("+dirty" if r["provenance"].get("dirty") else "")
                      for r in results})
    machines = sorted({f"{m.get('cpu_cores')} × {m.get('cpu_model')}" + (f", {m['gpu']}" if m.get("gpu") else "")
                       for m in (r["provenance"].get("machine") or {} for r in results)})
    hours = sum(r["provenance"]["wall_seconds"] for r in results) / 3600
    # Builds of the one student recipe (bench/quality_units.py: STUDENT_NLL_TOLERANCE): weights, held-out NLL.
    builds = sorted({(sha[:12], nll) for sha, nll in (student_build(r) for r in results) if sha},
                    key=lambda build: build[0])
    students = "; ".join(sha + ("" if nll is None else f" (held-out NLL {nll:.6f})") for sha, nll in builds)
    return (f"{len(results)} result files, {hours:.1f} h of unit wall time in all; commits {', '.join(commits)}; "
            f"machines: {'; '.join(machines)}" + (f"; student builds: {students}" if builds else "") + ".")


def student_build(result: dict) -> tuple[str | None, float | None]:
    """The SHA-256 of the student's weights a result used and its held-out NLL after healing."""
    student = result.get("student") or {}
    weights = (student.get("weights") or {}).get("model.safetensors") or {}
    return weights.get("sha256"), healed_nll(student)


def table_section(size: str, table: str, rows: list[Row], plots: Path, doc_dir: Path) -> tuple[str, list]:
    """The Markdown of one (size, table) and the writers of its PNGs (into ``plots``), run once every
    section has been read (a bad file anywhere: nothing written)."""
    models = [scores for row in rows for scores in row.scores]
    methods = [row for row in rows if row.seeds]
    baseline_row = next((row for row in methods if row.label.startswith("SFT (" if table == "main" else "MiniLLM (")),
                        methods[0])
    baseline = baseline_row.label
    metrics, differences = metric_tables(models, baseline, BOOTSTRAP)
    stem = f"bench-quality-{size}-{table}"
    curves = [row.curves for row in rows if row.curves is not None and row.curves.series]
    writers = [lambda: plot_metrics(rows, plots / f"{stem}.png")]
    if curves:
        writers.append(lambda: plot_curves(curves, plots / f"{stem}-curves.png"))
    link = lambda name: os.path.relpath(plots / name, doc_dir)  # noqa: E731
    parts = [f"## bench-quality `--size {size}`, {table} table\n", summary_table(rows)]
    if metrics:
        parts += [f"\n### Distillation metrics (mean [95 % interval] over {len(models[0].prompt_keys)} prompts)\n",
                  metrics]
    if differences:
        parts += [f"\n### Paired differences against {baseline}\n", differences]
        for label, same in same_seed_differences(rows, baseline_row):
            parts += [f"\n### Paired differences against {label}: the same training seeds\n", same]
        pair = single_step_pair(rows) if table == "ablations" else None
        if pair:
            parts += [f"\n### Paired differences: {pair[0]}\n", pair[1]]
    parts.append(f"\n![{stem}]({link(stem + '.png')})" + (f" ![{stem} curves]({link(stem + '-curves.png')})"
                                                            if curves else ""))
    mixed = mixed_starts(rows)
    if mixed:
        parts.append(f"\n**Note:** the MiniLLM rows of training seed(s) {', '.join(map(str, mixed))} started from "
                     "different SFT-init weights (the init was trained again after some of them finished).")
    parts.append(f"\nFrom {provenance([Path(scores.run_dir) for scores in models])}\n")
    return "\n".join(parts), writers


def build(results: Path, out: Path, plots: Path) -> tuple[str, list]:
    """The whole document (every size and table with method result files) and its PNG writers."""
    quality = results / "quality"
    sizes = sorted(path.name for path in quality.iterdir() if path.is_dir()) if quality.is_dir() else []
    sections, writers = [], []
    for size in sizes:
        for table in TABLES:
            rows = read_rows(quality / size, table)
            if any(row.seeds for row in rows):
                text, table_writers = table_section(size, table, rows, plots, out.parent)
                sections.append(text)
                writers += table_writers
    if not sections:
        raise ValueError(f"{quality}: no method result files; expected those bench/bench_quality.py writes")
    header = ("# Benchmark results\n\nGenerated by `make bench-report` (`bench/bench_report.py`) from the unit result "
              "files under `bench/results/` alone; do not edit. A row's seeds are averaged prompt by prompt; "
              f"intervals are {100 * BOOTSTRAP.confidence:g} % percentile bootstrap intervals over prompts "
              f"({BOOTSTRAP.resamples} resamples, seed {BOOTSTRAP.seed}), paired for differences; test Rouge-L "
              "is mean ± std over training seeds (the teacher: over test seeds). The teacher is judged by "
              "itself: reverse KL 0, and its NLL of its own answers is the reference for the students'.\n")
    return "\n".join([header, *sections]), writers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "bench-quality.md")
    parser.add_argument("--plots", type=Path, default=None, help="where the PNGs go (default: next to --out)")
    args = parser.parse_args(argv)
    plots = args.plots or args.out.parent
    try:
        text, writers = build(args.results.resolve(), args.out.resolve(), plots.resolve())
    except ValueError as err:
        print(f"bench-report: {err}", file=sys.stderr)
        return 2
    for write in writers:
        write()
    atomic_write_text(args.out, text)
    print(f"bench-report: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
