"""Does the student come out better, for the reasons the paper gives? (``make bench-quality``, v2)

Setting (``--size cpu``, the default; hours on 2 CPU cores): the SmolLM2-135M-Instruct teacher and a
student of 6 evenly spaced teacher layers *healed* by word-level distillation on ShareGPT text
(:mod:`minillm_rl.healing`; cached under ``artifacts/``); ShareGPT first turns in the chat template.
``--size gpu`` is the same comparison sized for one large GPU (bf16, larger batches, more data,
longer healing); it runs through this same code, and the test suite runs it at tiny size on CPU.

Two tables, two commands (each resumable: re-run to continue):

- ``--table main``: SFT, KD, SeqKD and MiniLLM.
- ``--table ablations``: MiniLLM (shared with the main table) against: without teacher-mixed sampling
  (``sampling.alpha=0``); without length normalisation; and the paper's single-step comparison —
  the same gradient estimated with the decomposition (``r_t`` only in the single-step term:
  ``advantage.include_current_reward=false``, ``loss.single_step=true``) or without it (``r_t`` in
  the reward-to-go, no single-step term). Full MiniLLM (the reference's default: ``r_t`` in the
  reward-to-go *and* the single-step term) is the decomposed estimator plus a token-level KL
  regulariser (algorithm.md §4.3).

Every method runs with ``--seeds`` training seeds under one compute budget: the same number of
training sequences through the student's forward + backward (SFT/KD/SeqKD: ``--epochs`` passes over
the N training examples; MiniLLM: ``--sft-epochs`` of SFT (its init, shared by a seed's MiniLLM
variants), then MiniLLM steps of ``train.micro_batch_size`` rollouts for the rest, whole rounds;
generation and teacher forwards, which need no student gradient, are not counted). MiniLLM runs
have the PT term on (``loss.lm_coef`` 1, ``kd_ratio`` 0.5, as the reference always does) on a
plain-text corpus disjoint from every test prompt. Checkpoints are selected by validation Rouge-L
under the test protocol (``eval.validation: test``).

Test (algorithm.md §6): ``--num-test`` prompts held out before anything else (ShareGPT: from the
first ``SHAREGPT_RESERVED_EXAMPLES`` examples, none of whose prompts the healing or PT text contains),
temperature 1, ``no_repeat_ngram_size`` 6, ``--test-seeds`` seeds, with the distillation metrics
against the teacher (:func:`~minillm_rl.evaluation.protocol.evaluate_models`): reverse KL, teacher
NLL of the answers, student NLL of references and teacher answers, Rouge-L against both, distinct-n,
repetition, length, EOS rate, each with a 95 % bootstrap interval over prompts, and paired
differences against SFT (``minillm-rl report``). The teacher's answers are sampled once per seed and
kept (``teacher_samples.json``). Output: ``OUT/<table>/report.md`` and ``curves.png``.

    python bench/bench_quality.py --table main|ablations [--size cpu|gpu] [--seeds 1 2 3] [--dry-run]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minillm_rl.config import RunConfig, load_config  # noqa: E402
from minillm_rl.data import load_instructions, split_validation  # noqa: E402
from minillm_rl.data.prepared import MANIFEST_NAME, PrepareSettings, prepare_dataset, read_manifest  # noqa: E402
from minillm_rl.tracking import atomic_write_text, log_line  # noqa: E402

RECIPE = REPO / "bench" / "bench_quality.yaml"
EXIT_PREEMPTED = 3
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
# The SFT run a seed's MiniLLM variants start from: trained, never evaluated or reported itself.
SFT_INIT = "SFT init"


@dataclass(frozen=True)
class Size:
    """One size of the benchmark: data, student, budget, test protocol and recipe overrides."""

    num_examples: int
    num_test: int
    test_seeds: tuple[int, ...]
    layers: int
    heal_tokens: int
    epochs: int
    sft_epochs: int
    pt_documents: int
    overrides: tuple[str, ...] = field(default_factory=tuple)


SIZES = {
    # Sized for <= 2.5 hours per table on 2 CPU cores. Healing (built once, cached, shared by both
    # tables): 589 824 tokens = 288 steps of 8 x 256, ~82 minutes at the 120 tokens/s measured here
    # for a 6-layer student, inside the one-time 90-minute budget (the frontier itself is unmeasured).
    "cpu": Size(num_examples=800, num_test=64, test_seeds=(10, 20, 30), layers=6, heal_tokens=589_824, epochs=3,
                sft_epochs=2, pt_documents=400),
    # One large GPU: the whole comparison in minutes (not yet measured on hardware).
    "gpu": Size(num_examples=3000, num_test=256, test_seeds=(10, 20, 30, 40, 50), layers=10, heal_tokens=40_000_000,
                epochs=3, sft_epochs=2, pt_documents=4000,
                overrides=("model.dtype=bfloat16", "runtime.deepspeed_config=ds_configs/zero2_bf16.json",
                           "runtime.worker_gpus=0.5", "runtime.worker_threads=4", "sft.batch_size=32",
                           "sft.micro_batch_size=32", "train.num_rollouts=64", "train.micro_batch_size=32",
                           "data.max_length=384", "data.max_prompt_tokens=128", "sampling.max_new_tokens=256",
                           "eval.max_new_tokens=256")),
}


@dataclass(frozen=True)
class PlannedRun:
    name: str
    run_dir: Path
    overrides: tuple[str, ...]
    init: PlannedRun | None = None  # the run whose ``sft_best_loss/`` this one starts from

    @property
    def reported(self) -> bool:
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
        return PlannedRun(name, run_dir, (*overrides, f"train.seed={seed}", f"output.dir={run_dir}"), init)

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


def run_status(run_dir: Path) -> str:
    """``"done"`` (run_summary.json written at the end), ``"resume"`` (a checkpoint), or ``"fresh"``."""
    if (run_dir / "run_summary.json").is_file():
        return "done"
    if (run_dir / "checkpoints" / "latest").is_file():
        return "resume"
    return "fresh"


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


def _cli(*args: str, log: Path) -> int:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as handle:
        return subprocess.run([sys.executable, "-m", "minillm_rl.cli", *args], cwd=REPO, env=env, stdout=handle,
                              stderr=subprocess.STDOUT, check=False).returncode


def train(run: PlannedRun, overrides: list[str], log: Path) -> None:
    """Train (or finish) ``run`` with ``overrides``; a preempted run (exit 3) is resumed until it finishes."""
    while (status := run_status(run.run_dir)) != "done":
        resume = "auto" if status == "resume" else "none"
        log_line(f"train {run.run_dir.name} ({'resuming' if resume == 'auto' else 'fresh'}); log {log}")
        code = _cli("train", "--config", str(RECIPE), *overrides, "--resume", resume, log=log)
        if code not in (0, EXIT_PREEMPTED):
            raise SystemExit(f"bench-quality: training {run.run_dir} failed (exit {code}); see {log}; re-run this "
                             "script to resume")


class Evaluator:
    """``minillm-rl eval``'s library path in this process, with the teacher's answers sampled once
    per seed for every model and kept in ``samples_path`` (keyed by the test prompts and protocol)."""

    def __init__(self, teacher: str, test: Path, cfg: RunConfig, seeds: tuple[int, ...], samples_path: Path):
        from minillm_rl.evaluation.protocol import EvalConfig

        self.teacher, self.test, self.cfg, self.samples_path = teacher, test, cfg, samples_path
        self.protocol = EvalConfig.test(max_new_tokens=cfg.eval.max_new_tokens, seeds=seeds)
        self.key = hashlib.sha256(test.read_bytes() + repr(self.protocol).encode()).hexdigest()
        saved = json.loads(samples_path.read_text()) if samples_path.is_file() else {}
        self.samples = {int(seed): ids for seed, ids in saved.get("samples", {}).items()} \
            if saved.get("key") == self.key else {}

    def __call__(self, model_dir: Path, out_dir: Path, with_teacher: bool = True) -> None:
        from minillm_rl.evaluation.protocol import evaluate_on_data

        if (out_dir / "results.json").is_file():
            return
        log_line(f"eval {model_dir} -> {out_dir}")
        evaluate_on_data(str(model_dir), str(self.test), out_dir, self.protocol, template=self.cfg.data.template,
                         max_prompt_tokens=self.cfg.data.max_prompt_tokens, dtype=self.cfg.model.dtype,
                         teacher_source=self.teacher if with_teacher else None, teacher_samples=self.samples)
        atomic_write_text(self.samples_path, json.dumps({"key": self.key, "samples": self.samples}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=TABLES, default="main", help="main (methods) or ablations")
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu", help="cpu (2 cores, hours) or gpu (one GPU)")
    parser.add_argument("--out", type=Path, default=None, help="default: artifacts/bench_quality[-SIZE]")
    parser.add_argument("--artifacts", default=str(REPO / "artifacts"), help="where the SmolLM2 models are built")
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
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    pick = lambda given, default: default if given is None else given  # noqa: E731

    if args.teacher is None or args.student is None:
        from minillm_rl.healing import healed_smollm2_student

        teacher, student = map(str, healed_smollm2_student(args.artifacts, size.layers, size.heal_tokens))
        args.teacher, args.student = args.teacher or teacher, args.student or student
    out = (args.out or REPO / "artifacts" / ("bench_quality" if args.size == "cpu" else f"bench_quality-{args.size}"))
    out = out.resolve()
    sets = [*size.overrides, *args.set]
    base = load_config(str(RECIPE), [*sets, f"model.teacher={args.teacher}", f"model.student={args.student}",
                                     "data.train=unused"])
    prepared, test = prepare_data(out, args.data, pick(args.num_examples, size.num_examples),
                                  pick(args.num_test, size.num_test), base, args.student)
    if args.pt_corpus is None and args.data == "sharegpt":
        from minillm_rl.models import load_tokenizer

        args.pt_corpus = str(sharegpt_pt_corpus(out, size.pt_documents, load_tokenizer(args.student)))
    num_train = read_manifest(prepared)["counts"]["train"]["kept"]
    common = [*sets, f"model.teacher={args.teacher}", f"model.student={args.student}", f"data.train={prepared}"]
    pt = [f"data.pretrain_corpus=[{args.pt_corpus}]"] if args.pt_corpus else ["loss.lm_coef=0"]

    def run_args(run: PlannedRun) -> list[str]:
        """The common settings, plus the PT corpus for MiniLLM runs (the term is MiniLLM's)."""
        return [*common, *(pt if run.overrides[0] == MINILLM[0] else ()), *run.overrides]

    epochs, sft_epochs = pick(args.epochs, size.epochs), pick(args.sft_epochs, size.sft_epochs)
    runs = plan_runs(out, base, num_train, args.seeds, epochs, sft_epochs, args.methods, args.table)
    for run in runs:
        sequences = sum(budget_sequences(load_config(str(RECIPE), run_args(part)), num_train)
                        for part in (run, run.init) if part is not None)
        print(f"{run.name:<56} {run.run_dir.name:<34} {run_status(run.run_dir):<6} {sequences} sequences  "
              f"{' '.join(run.overrides[:-1])}", flush=True)
    if args.dry_run:
        return
    logs = out / "logs"
    evaluate = Evaluator(args.teacher, test, base, tuple(pick(args.test_seeds, size.test_seeds)),
                         out / "teacher_samples.json")
    evaluate(Path(args.teacher), out / "eval-teacher", with_teacher=False)
    for run in runs:
        train(run, run_args(run), logs / f"{run.run_dir.name}.log")
        if run.reported:
            evaluate(run.run_dir / "best", run.run_dir / "eval")
    reported = [run for run in runs if run.reported]
    baseline = "SFT" if any(run.name == "SFT" for run in reported) else "MiniLLM"
    report_args = [f"teacher={out / 'eval-teacher'}", *(f"{run.name}={run.run_dir}" for run in reported)]
    table_dir = out / args.table
    if _cli("report", *report_args, "--out", str(table_dir), "--baseline", baseline,
            log=logs / f"report-{args.table}.log") != 0:
        raise SystemExit(f"bench-quality: report failed; see {logs / f'report-{args.table}.log'}")
    print((table_dir / "report.md").read_text())
    print(f"curves: {table_dir / 'curves.png'}")


if __name__ == "__main__":
    main()
