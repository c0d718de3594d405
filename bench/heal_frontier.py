"""Prune + heal frontier (``make heal-frontier``): held-out NLL of layer-pruned SmolLM2-135M-Instruct
students against the number of layers kept and the minutes of healing, on 2 CPU cores.

For each layer count (``--layers``, default 6 10 15 20 of the teacher's 30) one healing run
(:func:`minillm_rl.healing.heal_student`, the settings of ``minillm-rl init-student --heal-*``)
gets an equal share of ``--budget-minutes`` (the whole measurement, probes and evaluations
included; the lead runs it on an idle machine, default 90). Its token budget is that share times
the throughput measured by a 3-step probe of the same student (x ``--safety``, for the held-out
evaluations), and the held-out NLL is measured ``--points`` times along the run. The points of one
run follow one cosine schedule, so an early point is not what a run of that length would reach
(its learning rate has not decayed yet): the curve is an upper bound, exact at its last point.

Corpus: the ShareGPT examples after the first ``--reserved-examples`` (3000: every example the demo
and bench-quality use), minus repeats of their prompts, in the chat template; the same held-out
blocks for every layer count and the teacher. Output under ``--out`` (default
``artifacts/heal_frontier``): ``report.md`` (table), ``frontier.png`` (NLL against healing
minutes, one line per layer count, the teacher dashed), ``layers-<k>.json`` per layer count (kept:
a re-run measures only the layer counts not done yet).

    python bench/heal_frontier.py [--budget-minutes 90] [--layers 6 10 15 20] [--points 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from minillm_rl.data.healing_corpus import CorpusSource, build_heal_corpus, load_documents  # noqa: E402
from minillm_rl.healing import SHAREGPT_RESERVED_EXAMPLES, HealSettings, heal_student  # noqa: E402
from minillm_rl.models import (  # noqa: E402
    evenly_spaced_layers,
    load_causal_lm,
    load_tokenizer,
    prune_student,
    smollm2_teacher,
)
from minillm_rl.tracking import atomic_write_json, atomic_write_text, log_line  # noqa: E402

PROBE_STEPS = 3


def probe_tokens_per_second(teacher, student, corpus, settings: HealSettings) -> float:
    """Training tokens/s of ``PROBE_STEPS`` healing steps of a copy of ``student`` (the first step,
    with its one-time costs, is left out of the rate)."""
    step_tokens = settings.batch_size * settings.block_size
    one_block = dataclasses.replace(corpus, validation_blocks=corpus.validation_blocks[:1])  # its NLL: not timed
    seconds = []
    for steps in (1, PROBE_STEPS + 1):
        probe = dataclasses.replace(settings, tokens=steps * step_tokens, validation_blocks=1, eval_every_tokens=0)
        seconds.append(heal_student(copy.deepcopy(student), teacher, one_block, probe,
                                    log=lambda line: None)["train_seconds"])
    return PROBE_STEPS * step_tokens / max(seconds[1] - seconds[0], 1e-9)


def measure(layers: int, teacher, corpus, settings: HealSettings, seconds: float, points: int, safety: float) -> dict:
    keep = evenly_spaced_layers(teacher.config.num_hidden_layers, layers)
    student = prune_student(teacher, keep)
    started = time.monotonic()
    rate = probe_tokens_per_second(teacher, student, corpus, settings)
    step_tokens = settings.batch_size * settings.block_size
    train_seconds = max(seconds - (time.monotonic() - started), 0.0) * safety
    steps = max(1, int(rate * train_seconds) // step_tokens)
    every = max(1, steps // points) * step_tokens
    run = dataclasses.replace(settings, tokens=steps * step_tokens, eval_every_tokens=every)
    log_line(f"heal-frontier: {layers} layers {keep}: {rate:.0f} tokens/s in the probe -> {run.tokens} tokens, "
             f"held-out NLL every {every} tokens")
    result = heal_student(student, teacher, corpus, run)
    return {"layers": layers, "layers_kept": keep, "parameters": sum(p.numel() for p in student.parameters()),
            "probe_tokens_per_second": rate, "wall_seconds": time.monotonic() - started, **result}


def write_report(out: Path, results: list[dict], teacher_nll: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["| layers kept | parameters | NLL before | NLL after | (minutes, NLL) along the run | tokens | "
            "tokens/s | wall min |", "|---|---|---|---|---|---|---|---|"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for result in sorted(results, key=lambda r: r["layers"]):
        nll = result["held_out_nll"]
        curve = [(0.0, nll["student_before"])] + [(p["train_seconds"] / 60, p["nll"]) for p in result["curve"]]
        along = ", ".join(f"({minutes:.1f}, {value:.2f})" for minutes, value in curve[1:])
        rows.append(f"| {result['layers']} | {result['parameters'] / 1e6:.1f}M | {nll['student_before']:.2f} | "
                    f"{nll['student_after']:.2f} | {along} | {result['tokens_seen']} | "
                    f"{result['tokens_per_second']:.0f} | {result['wall_seconds'] / 60:.1f} |")
        axes.plot(*zip(*curve), marker="o", label=f"{result['layers']} layers")
    axes.axhline(teacher_nll, color="black", linestyle="--", label=f"teacher (30 layers) {teacher_nll:.2f}")
    axes.set_xlabel("healing minutes (training only, 2 CPU cores)")
    axes.set_ylabel("held-out NLL (nats/token)")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "frontier.png", dpi=120)
    plt.close(figure)
    first = results[0]
    corpus = first["corpus"]
    atomic_write_text(out / "report.md", "\n".join([
        "# Prune + heal frontier: SmolLM2-135M-Instruct students", "",
        f"Held-out NLL (nats/token) on {first['held_out_nll']['blocks']} blocks of "
        f"{first['held_out_nll']['block_size']} tokens never trained on (the teacher: {teacher_nll:.2f}). "
        f"Corpus: {corpus['description']} (sha256 {corpus['fingerprint'][:16]}...). Settings: "
        f"{json.dumps({k: v for k, v in first['settings'].items() if k not in ('tokens', 'eval_every_tokens')})}. "
        "Points along a run share its cosine schedule (an upper bound of what a run of that length reaches).", "",
        *rows, "", "Curve: `frontier.png`.", ""]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=90.0, help="the whole measurement (default 90)")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 10, 15, 20])
    parser.add_argument("--points", type=int, default=6, help="held-out NLL points along each run")
    parser.add_argument("--safety", type=float, default=0.85,
                        help="share of a layer count's time given to training steps (the rest: evaluations)")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--validation-blocks", type=int, default=None)
    parser.add_argument("--reserved-examples", type=int, default=SHAREGPT_RESERVED_EXAMPLES)
    parser.add_argument("--corpus-tokens", type=int, default=None,
                        help="tokenise only this many training tokens of the corpus (default: all; for quick checks)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--artifacts", default=str(REPO / "artifacts"))
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "heal_frontier")
    args = parser.parse_args(argv)

    started = time.monotonic()
    torch.set_num_threads(args.threads)
    overrides = {name: getattr(args, name) for name in ("block_size", "batch_size", "lr", "validation_blocks")
                 if getattr(args, name) is not None}
    per_layer_s = 60 * args.budget_minutes / len(args.layers)
    # The corpus is tokenised once (all of it, or --corpus-tokens); every run draws from its blocks.
    teacher_dir = smollm2_teacher(args.artifacts)
    tokenizer = load_tokenizer(teacher_dir)
    base = HealSettings(tokens=1 << 62, **overrides)
    source = CorpusSource(instructions="sharegpt", template="chat", reserved_examples=args.reserved_examples)
    corpus = build_heal_corpus(*load_documents(source, tokenizer), tokenizer, base.block_size, base.validation_blocks,
                               args.corpus_tokens or base.tokens, base.batch_size * base.block_size, base.seed)
    teacher = load_causal_lm(teacher_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    log_line(f"heal-frontier: corpus {corpus.description}: {len(corpus.train_blocks)} training blocks; "
             f"{per_layer_s / 60:.1f} min per layer count; setup {time.monotonic() - started:.0f} s")
    results = []
    for layers in args.layers:
        path = args.out / f"layers-{layers}.json"
        if not path.is_file():
            settings = dataclasses.replace(base, tokens=base.batch_size * base.block_size)
            atomic_write_json(path, measure(layers, teacher, corpus, settings, per_layer_s, args.points, args.safety))
        results.append(json.loads(path.read_text()))
    write_report(args.out, results, results[0]["held_out_nll"]["teacher"])
    print((args.out / "report.md").read_text())
    print(f"curve: {args.out / 'frontier.png'}; total {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
