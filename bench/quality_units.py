"""The units of ``bench/bench_quality.py`` (:mod:`units`): training runs through ``minillm-rl train``
subprocesses (resumed after a preemption), test evaluations in this process, and the result payload
of each unit — what the report needs, read from the run directory once the unit's work is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from minillm_rl.tracking import log_line
from units import Unit, read_result

if TYPE_CHECKING:
    from bench_quality import PlannedRun, Size

    from minillm_rl.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "bench" / "bench_quality.yaml"
EXIT_PREEMPTED = 3


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` (``flock``) while inside: a second bench-quality on the same ``--out`` would
    train the same runs, so it stops in one line (exit 2) instead."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"bench-quality: another bench-quality is running in {out}; wait for it to finish (both would "
                  "train the same runs)", file=sys.stderr)
            raise SystemExit(2) from None
        yield


def run_status(run_dir: Path) -> str:
    """``"done"`` (run_summary.json written at the end), ``"resume"`` (a checkpoint), or ``"fresh"``."""
    if (run_dir / "run_summary.json").is_file():
        return "done"
    if (run_dir / "checkpoints" / "latest").is_file():
        return "resume"
    return "fresh"


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
        # An attempt stopped before its first checkpoint left a run directory that a fresh run must replace.
        restart = ["--overwrite"] if status == "fresh" and (run.run_dir / "config.yaml").is_file() else []
        log_line(f"train {run.run_dir.name} ({'resuming' if resume == 'auto' else 'fresh'}); log {log}")
        code = _cli("train", "--config", str(RECIPE), *overrides, "--resume", resume, *restart, log=log)
        if code not in (0, EXIT_PREEMPTED):
            raise SystemExit(f"bench-quality: training {run.run_dir} failed (exit {code}); see {log}; re-run this "
                             "script to resume")


def unit_kind(size: str, prefix: str) -> str:
    """Units of one kind cost about the same: a teacher test, an SFT init, or one method's run + test
    (every MiniLLM variant is one kind: the same steps, one switch apart)."""
    return f"quality-{size}/{'minillm' if prefix.startswith('minillm') else prefix}"


def result_path(results: Path, size: str, prefix: str, seed: int) -> Path:
    """``<results>/quality/<size>/<prefix>/seed<N>.json`` (teacher: ``teacher/test-seed<S>.json``)."""
    name = f"test-seed{seed}.json" if prefix == "teacher" else f"seed{seed}.json"
    return results / "quality" / size / prefix / name


def test_payload(eval_dir: Path) -> dict:
    """What the report needs of one test evaluation (``minillm-rl eval``'s results.json without the
    answers), plus ``per_seed``: ``{test seed: {metric: one value per prompt}}`` from answers.jsonl
    (``per_prompt`` is their mean over the seeds, and the seed-free student NLL of references)."""
    results = json.loads((eval_dir / "results.json").read_text(encoding="utf-8"))
    answers = [json.loads(line) for line in (eval_dir / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    per_seed: dict[str, dict[str, list]] = {}
    for answer in answers:
        for sample in answer["samples"]:
            for key, value in sample["metrics"].items():
                per_seed.setdefault(str(sample["seed"]), {}).setdefault(key, []).append(value)
    return {**results, "per_seed": per_seed}


def training_payload(run_dir: Path) -> dict:
    """The resolved config, run summary, best.json and training curves (the report's curve panels)
    of a finished ``minillm-rl train`` run."""
    from minillm_rl.evaluation.report import CURVE_PANELS, metric_series, read_metrics

    keys = {key for _, key in CURVE_PANELS}
    series = metric_series(read_metrics(run_dir / "metrics.jsonl"))
    best = run_dir / "best.json"
    return {"config": yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")),
            "summary": json.loads((run_dir / "run_summary.json").read_text(encoding="utf-8")),
            "best": json.loads(best.read_text(encoding="utf-8")) if best.is_file() else None,
            "curves": {stage: {key: points for key, points in values.items() if key in keys}
                       for stage, values in series.items()}}


def student_identity(student: str) -> dict | None:
    """The student manifest's identity (layers kept, healing, weight SHA-256s; ``None`` without one)."""
    from minillm_rl.student_manifest import read_student_manifest

    manifest = read_student_manifest(student)
    return None if manifest is None else {key: value for key, value in manifest.items() if key != "format"}


# A healed student is rebuilt from its recipe on each machine (the user cache does not travel), and
# the same recipe does not give the same bits on another CPU: its kernels round differently (an
# Intel Xeon and an AMD EPYC without AVX-512 built this student with held-out NLLs 3.465532 and
# 3.465521; unhealed, already 1e-5 apart). So the plan's settings name the student by its recipe, each result records the
# weights it used (``student.weights``), and a student of that recipe is the same one only if its
# held-out NLL after healing agrees within this tolerance (nats/token): rounding moves it ~1e-5, a
# change of what healing does moves it by far more.
STUDENT_NLL_TOLERANCE = 1e-3


def student_recipe(student: dict | None, path: str) -> dict | str:
    """What makes a student what it is, up to floating-point rounding: the layers kept and how they
    were chosen, the teacher's shape, dtype, and the healing settings and corpus (``student``: its
    :func:`student_identity`); the directory's name for a student without a manifest."""
    if not student:
        return Path(path).name
    healing, selection, teacher = (student.get(key) or {} for key in ("healing", "layer_selection", "teacher"))
    return {"teacher": {key: teacher.get(key) for key in ("architecture", "num_layers")},
            "layers_kept": student.get("layers_kept"), "selection": selection.get("rule"),
            "selection_measured_on": selection.get("measured_on"), "dtype": student.get("dtype"),
            "healing": {key: healing.get(key) for key in ("settings", "corpus", "tokens_budget")}}


def healed_nll(student: dict | None) -> float | None:
    """A student identity's held-out NLL after healing (``None`` for a student never healed)."""
    return (((student or {}).get("healing") or {}).get("held_out_nll") or {}).get("student_after")


def check_student_builds(paths: list[Path], student: dict | None) -> None:
    """Refuse (one-line ``ValueError``) a result in ``paths`` whose student has a held-out NLL after
    healing more than :data:`STUDENT_NLL_TOLERANCE` from ``student``'s: the same recipe built by
    other code. (Another recipe is refused by the settings check.)"""
    planned = healed_nll(student)
    for path in paths:
        recorded = healed_nll((read_result(path) or {}).get("student"))
        if planned is not None and recorded is not None and abs(recorded - planned) > STUDENT_NLL_TOLERANCE:
            raise ValueError(f"{path}: made with a student whose held-out NLL after healing was {recorded:.6f}, "
                             f"this one's is {planned:.6f} (tolerance {STUDENT_NLL_TOLERANCE:g}): not the same "
                             "student up to rounding; delete the results to re-run them with this one")


class Evaluator:
    """``minillm-rl eval``'s library path in this process under the size's test protocol; every
    student is judged against the teacher's answers of the teacher units (``teacher_samples``:
    ``{test seed: answer ids per prompt}``)."""

    def __init__(self, teacher: str, test: Path, cfg: RunConfig, seeds: tuple[int, ...]):
        from minillm_rl.evaluation.protocol import EvalConfig

        self.teacher, self.test, self.cfg, self.seeds = teacher, test, cfg, seeds
        self.protocol = EvalConfig.test(max_new_tokens=cfg.eval.max_new_tokens, seeds=seeds)

    def __call__(self, model_dir: Path, out_dir: Path, teacher_samples: dict[int, list[list[int]]],
                 seeds: tuple[int, ...] | None = None, reuse: bool = True) -> dict:
        """Evaluate ``model_dir`` on ``seeds`` (default: all; unless ``reuse`` and ``out_dir`` holds a
        finished evaluation: a unit interrupted after it) and return :func:`test_payload`."""
        from minillm_rl.evaluation.protocol import evaluate_on_data

        if not reuse:
            shutil.rmtree(out_dir, ignore_errors=True)
        if not (out_dir / "results.json").is_file():
            log_line(f"eval {model_dir} -> {out_dir}")
            protocol = dataclasses.replace(self.protocol, seeds=seeds) if seeds else self.protocol
            evaluate_on_data(str(model_dir), str(self.test), out_dir, protocol, template=self.cfg.data.template,
                             max_prompt_tokens=self.cfg.data.max_prompt_tokens, dtype=self.cfg.model.dtype,
                             teacher_source=self.teacher, teacher_samples=teacher_samples)
        return test_payload(out_dir)


def plan_settings(args, size_name: str, sets: list[str], test_seeds: tuple[int, ...], student: dict | None) -> dict:
    """What every unit's result depends on besides its own method and seed, without machine-specific
    paths: the recipe (``bench_quality.yaml``, parsed), the size, data, budget, test seeds, ``--set``
    overrides (``runtime.*`` aside: where and how the work runs, not what it computes), PT corpus,
    and the models (the student by its recipe: :func:`student_recipe`)."""
    return {"recipe": yaml.safe_load(RECIPE.read_text(encoding="utf-8")), "size": size_name,
            "data": args.data if args.data == "sharegpt" else Path(args.data).name,
            "num_examples": args.num_examples, "num_test": args.num_test, "epochs": args.epochs,
            "sft_epochs": args.sft_epochs, "test_seeds": list(test_seeds),
            "sets": [item for item in sets if not item.startswith("runtime.")],
            "pt_corpus": None if args.pt_corpus is None else Path(args.pt_corpus).name,
            "teacher": Path(args.teacher).name,
            "student": student_recipe(student, args.student)}


def portable_overrides(overrides) -> list[str]:
    """A run's own overrides without its paths (its output directory, the SFT init it starts from)."""
    return [item for item in overrides if not item.startswith(("output.dir=", "model.student="))]


def build_units(args, size: Size, runs: list[PlannedRun], run_args, evaluate: Evaluator, logs: Path,
                settings: dict) -> list[Unit]:
    """The teacher's test units (one per test seed), then the runs' units seed by seed (seed 1 of every
    method first, each SFT init before the MiniLLM variants that start from it). ``settings``:
    :func:`plan_settings`, recorded in (and checked against) every result file."""
    results, test_seeds = args.results, evaluate.seeds
    student = student_identity(args.student)
    teacher_units = [result_path(results, args.size, "teacher", seed) for seed in test_seeds]

    def teacher_work(seed: int):
        def work() -> dict:
            # Judged by itself (reverse KL 0; its NLL of its own answers: the reference for the students'),
            # the teacher also samples the answers every student's test is judged against.
            samples: dict[int, list[list[int]]] = {}
            test = evaluate(Path(args.teacher), args.out / "eval-teacher" / f"seed{seed}", samples, (seed,),
                            reuse=False)
            return {"model": "teacher", "test_seed": seed, "teacher": args.teacher, "test": test,
                    "teacher_answer_ids": samples[seed]}
        return work

    def teacher_samples() -> dict[int, list[list[int]]]:
        return {seed: read_result(path)["teacher_answer_ids"] for seed, path in zip(test_seeds, teacher_units)}

    def run_work(run: PlannedRun):
        def work() -> dict:
            from minillm_rl.student_manifest import weight_checksums

            started_from = run_status(run.run_dir)
            train(run, run_args(run), logs / f"{run.run_dir.name}.log")
            # A method's test is of its selected checkpoint; an SFT init's of the weights MiniLLM starts from.
            tested = run.run_dir / ("best" if run.reported else "sft_best_loss")
            start = None if run.init is None else run.init.run_dir / "sft_best_loss"
            return {"method": run.name, "seed": run.seed, "size": args.size, "started_from": started_from,
                    "overrides": list(run_args(run)), "student": student,
                    "init": None if start is None else {"unit": f"sft-init/seed{run.seed}",
                                                        "weights": weight_checksums(start)},
                    "training": training_payload(run.run_dir), "tested_checkpoint": tested.name,
                    "test": evaluate(tested, run.run_dir / ("eval" if run.reported else "eval-init"),
                                     teacher_samples())}
        return work

    # The teacher's test depends on the data, the test protocol and the model's dtype only.
    teacher_settings = {key: settings[key] for key in ("size", "data", "num_examples", "num_test", "teacher")}
    teacher_settings["recipe"] = {key: settings["recipe"].get(key) for key in ("data", "eval")}
    teacher_settings["sets"] = [item for item in settings["sets"] if item.startswith(("data.", "eval.", "model."))]
    units = [Unit(f"teacher/test-seed{seed}", unit_kind(args.size, "teacher-test"), path, teacher_work(seed),
                  size.estimate_minutes.get("teacher-test", 10), settings={**teacher_settings, "test_seed": seed})
             for seed, path in zip(test_seeds, teacher_units)]
    by_seed = sorted(runs, key=lambda run: run.seed)  # stable: each init stays before its variants
    for run in by_seed:
        path, kind = result_path(results, args.size, run.prefix, run.seed), unit_kind(args.size, run.prefix)
        needs, pending = tuple(unit.name for unit in units[:len(test_seeds)]), None
        if run.init is not None:
            needs += (f"sft-init/seed{run.seed}",)
        if not run.reported:  # an init whose checkpoint is gone is trained again while a variant needs it
            variants = [other for other in runs if other.init is run]
            pending = (lambda run=run, path=path, variants=variants: not path.is_file() or (
                not (run.run_dir / "sft_best_loss").is_dir() and any(
                    not result_path(results, args.size, v.prefix, v.seed).is_file() for v in variants)))
        units.append(Unit(f"{run.prefix}/seed{run.seed}", kind, path, run_work(run),
                          size.estimate_minutes.get(kind.split("/")[1], 30), needs, pending,
                          {**settings, "method": run.name, "seed": run.seed,
                           "overrides": portable_overrides(run.overrides)}))
    return units


