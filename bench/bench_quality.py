"""Does the student come out better, for the reasons the paper gives? (``make bench-quality``, v2)

Setting (``--size cpu``, the default; hours on 2 CPU cores): the SmolLM2-135M-Instruct teacher and a
student pruned from it and *healed* by word-level distillation on ShareGPT text
(:func:`minillm_rl.healing.healed_smollm2_student`, cached in :func:`minillm_rl.models.cache_dir`);
ShareGPT first turns in the chat template. ``--size gpu`` is the same comparison sized for one large
GPU (bf16, larger batches, more data, longer healing); it runs through this same code, and the test
suite runs it at tiny size on CPU.

Two tables: ``--table main`` (SFT, KD, SeqKD, MiniLLM) and ``--table ablations``: MiniLLM (shared
with the main table) against: without teacher-mixed sampling (``sampling.alpha=0``); without length
normalisation; and the paper's single-step comparison — the same gradient estimated with the
decomposition (``r_t`` only in the single-step term: ``advantage.include_current_reward=false``,
``loss.single_step=true``) or without it (``r_t`` in the reward-to-go, no single-step term). Full
MiniLLM (the reference's default: both) is the decomposed estimator plus a token-level KL
regulariser (algorithm.md §4.3).

Every method runs with ``--seeds`` training seeds under one compute budget: the same number of
training sequences through the student's forward + backward (SFT/KD/SeqKD: ``--epochs`` passes over
the N training examples; MiniLLM: ``--sft-epochs`` of SFT (its init, shared by a seed's MiniLLM
variants), then MiniLLM steps of ``train.micro_batch_size`` rollouts for the rest, whole rounds).
MiniLLM runs have the PT term on (``loss.lm_coef`` 1, ``kd_ratio`` 0.5, as the reference) on a
plain-text corpus disjoint from every test prompt. Checkpoints are selected by validation Rouge-L
under the test protocol (``eval.validation: test``). Test (algorithm.md §6): ``--num-test`` prompts
held out before anything else (ShareGPT: from its first ``SHAREGPT_RESERVED_EXAMPLES`` examples,
which no healing or PT text contains), temperature 1, ``no_repeat_ngram_size`` 6, ``--test-seeds``,
with the distillation metrics against the teacher (:func:`~minillm_rl.evaluation.protocol.evaluate_models`).

**Units** (:mod:`units`, :mod:`quality_units`): the work is cut into units of <= ~40 minutes, each
of which, when it finishes, writes one result file under ``--results`` (default ``bench/results``,
committed; layout in ``bench/results/README.md``): the teacher's test answers and metrics per test
seed (every student's test is judged against those answers), a seed's SFT init for MiniLLM (with a
test of the checkpoint MiniLLM starts from: a reference row), and one method x seed (its training
and its test together, since a checkpoint lost with a session cannot be tested later). Each holds
the settings it depends on, the resolved run config, the student's manifest identity (its weights
included), the per-prompt (and per test seed) metrics, commit, wall time and machine. The settings
name the student by its recipe: the same recipe on another CPU gives other bits, and a rebuilt
student is accepted when its held-out NLL after healing agrees within 1e-3 nats (see
:data:`quality_units.STUDENT_NLL_TOLERANCE`). Only units without a result
file run — teacher units first, then seed 1 of every method, then seed 2, ... — and an existing
result of other settings stops the run (one line). ``--budget-minutes N`` starts no unit whose
measured cost (the longest wall time of its kind among the result files, or the size's stated
estimate) exceeds what is left of N minutes counted from the start. Checkpoints, data and logs live
in ``--out`` (default ``<cache>/bench_quality/<size>``, one bench-quality at a time per ``--out``).
``bench/bench_report.py`` builds the tables from the result files alone.

    python bench/bench_quality.py --table main|ablations [--size cpu|gpu] [--seeds 1 2 3]
        [--budget-minutes N] [--results DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from minillm_rl.cli import quiet_progress_bars_off_a_terminal  # noqa: E402
from minillm_rl.config import RunConfig, load_config  # noqa: E402
from minillm_rl.data import load_instructions, split_validation  # noqa: E402
from minillm_rl.data.prepared import MANIFEST_NAME, PrepareSettings, prepare_dataset, read_manifest  # noqa: E402
from minillm_rl.tracking import atomic_write_text, log_line  # noqa: E402
from quality_units import (  # noqa: E402
    RECIPE,
    Evaluator,
    build_units,
    check_student_builds,
    exclusive,
    plan_settings,
    run_status,
    student_identity,
)
from units import RESULTS, run_units  # noqa: E402

MINILLM = ("train.phases=[minillm]",)
# (row name, run directory prefix, overrides, tables) of every method, in table order.
METHODS = (
    ("SFT", "sft", ("train.phases=[sft]",), ("main",)),
    ("KD", "kd", ("train.phases=[kd]",), ("main",)),
    ("SeqKD", "seqkd", ("train.phases=[seqkd]",), ("main",)),
    ("MiniLLM", "minillm", MINILLM, ("main", "ablations")),
    ("MiniLLM w/o teacher-mixed sampling", "minillm-alpha0", (*MINILLM, "sampling.alpha=0"), ("ablations",)),
    ("MiniLLM w/o length normalisation", "minillm-no-length-norm", (*MINILLM, "advantage.length_normalize=false"),
     ("ablations",)),
    ("MiniLLM, r_t only in the single-step term (decomposed)", "minillm-decomposed",
     (*MINILLM, "advantage.include_current_reward=false"), ("ablations",)),
    ("MiniLLM, r_t in the reward-to-go, w/o single-step term", "minillm-no-single-step",
     (*MINILLM, "loss.single_step=false"), ("ablations",)),
)
TABLES = ("main", "ablations")
# The paper's single-step comparison (spec section 4.3): the same gradient estimated with the
# decomposition (r_t excluded + L_single) and without it (r_t included, no L_single).
SINGLE_STEP_PAIR = ("minillm-decomposed", "minillm-no-single-step")
# The SFT run a seed's MiniLLM variants start from (``--sft-epochs`` of SFT, checkpoint of the best
# validation loss): tested as a reference row (what the MiniLLM phase started from), not a method.
SFT_INIT = "SFT init"


@dataclass(frozen=True)
class Size:
    """One size of the benchmark: data, student, budget, test protocol, recipe overrides, and the
    stated minutes of each unit kind (:func:`unit_kind`) until a result of that kind has measured it."""

    num_examples: int
    num_test: int
    test_seeds: tuple[int, ...]
    layers: int
    heal_tokens: int
    epochs: int
    sft_epochs: int
    pt_documents: int
    overrides: tuple[str, ...] = field(default_factory=tuple)
    estimate_minutes: dict[str, float] = field(default_factory=dict)
    select: str = "influence"  # which teacher layers the student keeps (when healing supports choosing)


SIZES = {
    # The student is the demo's, chosen from the heal frontier (bench/results/frontier/): the 20 teacher
    # layers of highest block influence, healed for 32 768 tokens (held-out NLL 4.56 -> 3.47, teacher
    # 2.48; measured 2026-12-06), built once in the user cache and shared with `make demo`. Its SFT
    # step measured 6.5 s (idle, 2026-12-06) against the 6-layer student's 1.6 s: ~4x, not the 2x
    # the multiply-adds per token suggest (98M against 49M). At 3 supervised epochs a seed of both
    # tables was ~4.5 hours here, so the budget is 2 epochs (1 of them the SFT init before MiniLLM):
    # the MiniLLM phase keeps its 56 steps (one pass of rollouts over the training prompts), and the
    # supervised units shrink by a third. The data (and so the teacher's test units) is unchanged.
    "cpu": Size(num_examples=800, num_test=64, test_seeds=(10, 20, 30), layers=20, heal_tokens=32_768, epochs=2,
                sft_epochs=1, pt_documents=400,
                # Per-step times of the 20-layer student (SFT 6.5 s; KD, MiniLLM scaled from the 6-layer
                # student's 3.6 and 11.5 s by the same 4x), plus start-up, validation and the test;
                # replaced by measured wall times as result files land.
                estimate_minutes={"teacher-test": 4, "sft-init": 12, "sft": 18, "kd": 32, "seqkd": 32, "minillm": 45}),
    # One large GPU: the whole comparison in minutes (not yet measured on hardware; the unit minutes are guesses).
    "gpu": Size(num_examples=3000, num_test=256, test_seeds=(10, 20, 30, 40, 50), layers=10, heal_tokens=40_000_000,
                epochs=3, sft_epochs=2, pt_documents=4000,
                overrides=("model.dtype=bfloat16", "runtime.deepspeed_config=ds_configs/zero2_bf16.json",
                           "runtime.worker_gpus=0.5", "runtime.worker_threads=4", "sft.batch_size=32",
                           "sft.micro_batch_size=32", "train.num_rollouts=64", "train.micro_batch_size=32",
                           "data.max_length=384", "data.max_prompt_tokens=128", "sampling.max_new_tokens=256",
                           "eval.max_new_tokens=256"),
                estimate_minutes={"teacher-test": 5, "sft-init": 10, "sft": 15, "kd": 20, "seqkd": 20, "minillm": 25}),
}


@dataclass(frozen=True)
class PlannedRun:
    name: str
    prefix: str  # the run directory's and the result file's name (with the seed)
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]
    init: PlannedRun | None = None  # the run whose ``sft_best_loss/`` this one starts from

    @property
    def reported(self) -> bool:
        """A method of the table (at the full budget), not an SFT init."""
        return self.name != SFT_INIT


def supervised_sequences(epochs: int, num_train: int, batch_size: int) -> int:
    """Training sequences of ``epochs`` supervised epochs (a partial last batch is not a step)."""
    return epochs * (num_train // batch_size) * batch_size


def minillm_total_steps(sequences: int, cfg: RunConfig) -> int:
    """MiniLLM optimizer steps for ``sequences`` rollout rows: whole rounds, at least one."""
    steps_per_round = cfg.train.ppo_epochs * (cfg.train.num_rollouts // cfg.train.micro_batch_size)
    rounds = max(1, sequences // cfg.train.micro_batch_size // steps_per_round)
    return rounds * steps_per_round


def budget_sequences(cfg: RunConfig, num_train: int) -> int:
    """Sequences through the student's forward + backward of a whole run of ``cfg`` (MiniLLM runs
    whole rounds, as ``runtime.phases.minillm.run_minillm`` does)."""
    total = 0
    for phase in cfg.train.phases:
        if phase == "minillm":
            train = cfg.train
            steps_per_round = train.ppo_epochs * (train.num_rollouts // train.micro_batch_size)
            rounds = min(-(-train.total_steps // steps_per_round), train.max_prompt_epochs * num_train // train.num_rollouts)
            total += rounds * steps_per_round * train.micro_batch_size
        else:
            total += supervised_sequences(cfg.sft.num_epochs, num_train, cfg.sft.batch_size)
    return total


def plan_runs(out: Path, base: RunConfig, num_train: int, seeds: list[int], epochs: int, sft_epochs: int,
              methods: list[str] | None = None, table: str | None = None) -> list[PlannedRun]:
    """Every (method, seed) run of ``table`` (or ``methods``) with its overrides, each SFT init
    before the MiniLLM variants that start from it; ``base`` is the recipe with the common overrides."""
    if not 1 <= sft_epochs < epochs:
        raise ValueError(f"--sft-epochs {sft_epochs}: expected 1 <= it < --epochs ({epochs}); MiniLLM needs "
                         "SFT epochs and some budget left")
    known = [name for name, *_ in METHODS]
    unknown = sorted(set(methods or ()) - set(known))
    if unknown:
        raise ValueError(f"--methods {unknown}: unknown; expected some of {known}")
    minillm_steps = minillm_total_steps(supervised_sequences(epochs - sft_epochs, num_train, base.sft.batch_size),
                                        base)

    def planned(name: str, prefix: str, seed: int, overrides: tuple[str, ...], init: PlannedRun | None = None):
        run_dir = out / "runs" / f"{prefix}-seed{seed}"
        return PlannedRun(name, prefix, seed, run_dir, (*overrides, f"train.seed={seed}", f"output.dir={run_dir}"),
                          init)

    runs, inits = [], {}
    for name, prefix, overrides, tables in METHODS:
        if (methods and name not in methods) or (table and table not in tables):
            continue
        for seed in seeds:
            if overrides[0] != MINILLM[0]:
                runs.append(planned(name, prefix, seed, (*overrides, f"sft.num_epochs={epochs}")))
                continue
            if seed not in inits:  # trained before the first MiniLLM variant that needs it
                inits[seed] = planned(SFT_INIT, "sft-init", seed, ("train.phases=[sft]", f"sft.num_epochs={sft_epochs}"))
                runs.append(inits[seed])
            init = inits[seed]
            runs.append(planned(name, prefix, seed, (*overrides, f"model.student={init.run_dir / 'sft_best_loss'}",
                                                     f"train.total_steps={minillm_steps}"), init))
    return runs


def _write_jsonl(path: Path, examples) -> None:
    atomic_write_text(path, "".join(json.dumps({"instruction": e.instruction, "context": e.input,
                                                "response": e.response}, ensure_ascii=False) + "\n"
                                    for e in examples))


def prepare_data(out: Path, source: str, num_examples: int, num_test: int, base: RunConfig,
                 student: str) -> tuple[Path, Path]:
    """``(prepared dataset dir, test jsonl)``: the test prompts are held out first, the rest is
    prepared (train / validation split of the recipe). Kept when already there."""
    from minillm_rl.models import load_tokenizer

    data_dir = out / "data"
    pool, test = data_dir / "train_pool.jsonl", data_dir / "test.jsonl"
    if not (pool.is_file() and test.is_file()):
        loaded = load_instructions(source, skip_bad=True, max_examples=num_examples)
        train_examples, test_examples = split_validation(loaded.examples, num_test, seed=1234)
        _write_jsonl(test, test_examples)
        _write_jsonl(pool, train_examples)
    prepared = data_dir / "prepared"
    if not (prepared / MANIFEST_NAME).is_file():
        data = base.data
        settings = PrepareSettings(template=data.template, max_prompt_tokens=data.max_prompt_tokens,
                                   max_length=data.max_length, num_validation=data.num_validation,
                                   split_seed=data.split_seed)
        manifest = prepare_dataset(str(pool), load_tokenizer(student), student, prepared, settings, overwrite=True)
        log_line(f"prepared {prepared}: {manifest['counts']['train']['kept']} train, "
                 f"{manifest['counts']['validation']['kept']} validation")
    return prepared, test


def sharegpt_pt_corpus(out: Path, num_documents: int, tokenizer) -> Path:
    """A directory of ``num_documents`` ShareGPT documents (prompt + answer, chat template) from the
    examples after the first ``SHAREGPT_RESERVED_EXAMPLES``, minus any repeating one of their
    prompts (:func:`~minillm_rl.data.healing_corpus.instruction_documents`): disjoint from every test
    prompt, which the benchmark takes from those first examples. Kept when already there."""
    from minillm_rl.data.healing_corpus import instruction_documents
    from minillm_rl.healing import SHAREGPT_RESERVED_EXAMPLES

    corpus = out / "data" / "pt_corpus"
    if not corpus.is_dir():
        examples = load_instructions("sharegpt", skip_bad=True).examples
        documents, _ = instruction_documents(examples, SHAREGPT_RESERVED_EXAMPLES, "chat", tokenizer)
        staging = corpus.with_name("pt_corpus.partial")
        staging.mkdir(parents=True, exist_ok=True)
        for index, document in enumerate(documents[:num_documents]):
            (staging / f"{index:06d}.txt").write_text(document, encoding="utf-8")
        os.replace(staging, corpus)
    return corpus


def main(argv: list[str] | None = None) -> None:
    from minillm_rl.models import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=TABLES, default="main", help="main (methods) or ablations")
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu", help="cpu (2 cores, hours) or gpu (one GPU)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the unit result files are written (default: bench/results)")
    parser.add_argument("--out", type=Path, default=None, help="checkpoints, data, logs (default: "
                        "<MINILLM_RL_CACHE>/bench_quality/SIZE)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="start no unit whose measured cost exceeds the minutes left")
    parser.add_argument("--teacher", default=None, help="teacher directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--student", default=None, help="student directory (default: the size's healed student)")
    parser.add_argument("--data", default="sharegpt", help="instruction data source (default: sharegpt)")
    parser.add_argument("--pt-corpus", default=None, help="plain-text PT corpus (default for sharegpt: its text "
                                                          "after the reserved examples)")
    parser.add_argument("--num-examples", type=int, default=None, help="examples read from --data")
    parser.add_argument("--num-test", type=int, default=None, help="held-out test prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds")
    parser.add_argument("--test-seeds", type=int, nargs="+", default=None)
    parser.add_argument("--epochs", type=int, default=None, help="budget: supervised epochs of SFT / KD / SeqKD")
    parser.add_argument("--sft-epochs", type=int, default=None, help="SFT epochs before MiniLLM (of --epochs)")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the table's methods (row names)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the units it would start, and stop "
                        "(after building, once, the healed student and the prepared data the plan counts)")
    args = parser.parse_args(argv)
    budget_started = time.monotonic()  # building the student and the data count against --budget-minutes too
    quiet_progress_bars_off_a_terminal()  # a log file gets whole lines, no '\r' bar frames
    size = SIZES[args.size]
    for name in ("num_examples", "num_test", "epochs", "sft_epochs", "test_seeds"):  # the size's unless given
        if getattr(args, name) is None:
            setattr(args, name, getattr(size, name))

    if args.teacher is None or args.student is None:
        from minillm_rl.healing import healed_smollm2_student

        # Not a unit here: the heal frontier's (same function and cache); resumable, and counted in the budget.
        print(f"bench-quality: the {args.size} size's student: {size.layers} layers by {size.select}, healed for "
              f"{size.heal_tokens} tokens (built first unless it is in {cache_dir()})", flush=True)
        teacher, student = map(str, healed_smollm2_student(cache_dir(), size.layers, size.heal_tokens, size.select))
        args.teacher, args.student = args.teacher or teacher, args.student or student
    args.out = (args.out or cache_dir() / "bench_quality" / args.size).resolve()
    args.results = args.results.resolve()
    with exclusive(args.out):
        run_plan(args, size, budget_started)


def run_plan(args: argparse.Namespace, size: Size, budget_started: float) -> None:
    """Prepare the data (once), plan the runs and their units, and run the pending units."""
    sets = [*size.overrides, *args.set]
    base = load_config(str(RECIPE), [*sets, f"model.teacher={args.teacher}", f"model.student={args.student}",
                                     "data.train=unused"])
    prepared, test = prepare_data(args.out, args.data, args.num_examples, args.num_test, base, args.student)
    if args.pt_corpus is None and args.data == "sharegpt":
        from minillm_rl.models import load_tokenizer

        args.pt_corpus = str(sharegpt_pt_corpus(args.out, size.pt_documents, load_tokenizer(args.student)))
    num_train = read_manifest(prepared)["counts"]["train"]["kept"]
    common = [*sets, f"model.teacher={args.teacher}", f"model.student={args.student}", f"data.train={prepared}"]
    pt = [f"data.pretrain_corpus=[{args.pt_corpus}]"] if args.pt_corpus else ["loss.lm_coef=0"]

    def run_args(run: PlannedRun) -> list[str]:
        """The common settings, plus the PT corpus for MiniLLM runs (the term is MiniLLM's)."""
        return [*common, *(pt if run.overrides[0] == MINILLM[0] else ()), *run.overrides]

    runs = plan_runs(args.out, base, num_train, args.seeds, args.epochs, args.sft_epochs, args.methods, args.table)
    for run in runs:
        sequences = sum(budget_sequences(load_config(str(RECIPE), run_args(part)), num_train)
                        for part in (run, run.init) if part is not None)
        print(f"{run.name:<56} {run.run_dir.name:<34} {run_status(run.run_dir):<6} {sequences} sequences  "
              f"{' '.join(run.overrides[:-1])}", flush=True)
    evaluate = Evaluator(args.teacher, test, base, tuple(args.test_seeds))
    student = student_identity(args.student)
    settings = plan_settings(args, args.size, sets, evaluate.seeds, student)
    units = build_units(args, size, runs, run_args, evaluate, args.out / "logs", settings)
    try:
        check_student_builds([unit.result_path for unit in units if unit.result_path.is_file()], student)
        summary = run_units(units, args.budget_minutes, dry_run=args.dry_run, budget_started=budget_started,
                            log=lambda line: print(f"bench-quality: {line}", flush=True))
    except ValueError as err:  # a corrupt result file, or one of other settings: one line, nothing run
        print(f"bench-quality: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if summary.remaining:
        print("bench-quality: remaining: " + ", ".join(summary.remaining), flush=True)
    if summary.done:
        print(f"bench-quality: new result files under {args.results}; tables: python bench/bench_report.py", flush=True)


if __name__ == "__main__":
    main()
