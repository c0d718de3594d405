"""The teacher signal side by side: ``exact`` ([B, T, V] log-probs) against ``hidden`` ([B, T, d]
final hidden states + the learner's copy of the LM head), in one process, interleaved.

Setting: teacher SmolLM2-135M-Instruct (dequantised GGUF, fp32), student its 6-layer pruned copy,
ShareGPT first user turns in the chat template, alpha 0.2 (the reference: teacher-mixed decoding
records the signal every step), ``--new-tokens`` per response (EOS disabled, every response full
length), batch ``--batch-size``, one PPO epoch of one micro-batch on a ``TorchEngine`` (a fresh
copy of the student for each measurement, so both modes learn from the same weights).

Per mode (the two modes alternate, the order flipping every repetition, a warm-up first): rollout
seconds (``sample_rollouts``), learner seconds (``ppo_round`` over the mode's last rollout), the
rollout's teacher-signal bytes, tensor bytes (what a worker puts into the replay store and rank 0
broadcasts) and pickled size. Then what bf16 does to the single-step KL: per-token KL from bf16
log-probs (exact) and from bf16 hidden states (hidden) against the fp32 exact value, for the
student and for the teacher in the student's place (true KL 0: the rounding floor).

    python bench/bench_teacher_signal.py [--reps 2] [--learn-reps 5] [--batch-size 8] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import copy
import pickle
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minillm_rl.cli import quiet_progress_bars_off_a_terminal  # noqa: E402
from minillm_rl.algorithm.advantages import AdvantageConfig
from minillm_rl.algorithm.batching import left_pad
from minillm_rl.algorithm.chunked_vocab import reverse_kl_to_teacher, reverse_kl_to_teacher_hidden
from minillm_rl.algorithm.engine import TorchEngine
from minillm_rl.algorithm.forward import response_logits
from minillm_rl.algorithm.ppo import MiniLLMLossConfig, ppo_round
from minillm_rl.algorithm.sampler import SamplingConfig, sample_rollouts
from minillm_rl.algorithm.teacher_head import HiddenTeacher
from minillm_rl.config import OptimConfig
from minillm_rl.data import InstructionExample, format_prompt, load_instructions
from minillm_rl.models import load_causal_lm, load_lm_head, load_tokenizer, smollm2_teacher_and_student
from minillm_rl.runtime.replay import tensor_bytes

MODES = ("exact", "hidden")


def chat_prompts(tokenizer, count: int, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` ShareGPT first user turns whose chat prompt fits ``prompt_len`` tokens."""
    prompts = []
    for example in load_instructions("sharegpt", skip_bad=True, max_examples=200 * count).examples:
        if example.input.strip():
            continue
        ids = tokenizer(format_prompt(InstructionExample(example.instruction, "", "", "bench"), "chat", tokenizer),
                        add_special_tokens=False).input_ids
        if len(ids) <= prompt_len:
            prompts.append(ids)
            if len(prompts) == count:
                return left_pad(prompts, tokenizer.pad_token_id)
    raise ValueError(f"only {len(prompts)} ShareGPT prompts fit {prompt_len} tokens")


def signal_bytes(rollout) -> int:
    """Bytes of the teacher-signal field of a rollout (the rest is the same in every mode)."""
    return tensor_bytes([rollout.teacher_dist_logprobs, rollout.teacher_hidden,
                         rollout.teacher_topk_logprobs, rollout.teacher_topk_ids])


def sample(student, teacher, prompt_ids, prompt_mask, mode: str, seed: int, args, dtype=torch.float32):
    sampling = SamplingConfig(alpha=0.2, max_new_tokens=args.new_tokens, teacher_dist=mode, teacher_dist_dtype=dtype)
    started = time.perf_counter()
    rollout = sample_rollouts(student, teacher, prompt_ids, prompt_mask, sampling, eos_token_id=None,
                              pad_token_id=0, generator=torch.Generator().manual_seed(seed))
    return sampling, rollout, time.perf_counter() - started


def learn(student, sampling, rollout, head, args) -> tuple[float, float]:
    """Seconds of one PPO epoch over ``rollout`` (one micro-batch) on a fresh copy of ``student``,
    and its single-step KL."""
    engine = TorchEngine(copy.deepcopy(student), OptimConfig(lr=1e-6, warmup_steps=0))
    started = time.perf_counter()
    history = ppo_round(engine, rollout, sampling, AdvantageConfig(), MiniLLMLossConfig(), ppo_epochs=1,
                        micro_batch_size=args.batch_size, generator=torch.Generator().manual_seed(0),
                        teacher_head=head if sampling.teacher_dist == "hidden" else None)
    return time.perf_counter() - started, history[0]["single/kl"]


@torch.no_grad()
def bf16_effect(student, teacher, head, prompt_ids, prompt_mask, args) -> dict:
    """Per-token single-step KL of one rollout from bf16 signals against the fp32 exact value, for
    the student, and for the teacher itself in the student's place (true KL 0: the error floor)."""
    rollouts = {(mode, dtype): sample(student, teacher, prompt_ids, prompt_mask, mode, 99, args, dtype)[1]
                for mode in MODES for dtype in (torch.float32, torch.bfloat16)}
    reference = rollouts["exact", torch.float32]
    effect = {}
    for name, model in (("student", student), ("teacher as student", teacher)):
        logits = response_logits(model, reference.prompt_ids, reference.prompt_mask, reference.response_ids,
                                 reference.response_mask)
        kl = {}
        for (mode, dtype), rollout in rollouts.items():
            kl[mode, dtype] = (reverse_kl_to_teacher(logits, rollout.teacher_dist_logprobs) if mode == "exact" else
                               reverse_kl_to_teacher_hidden(logits, HiddenTeacher(rollout.teacher_hidden, head))).double()
        exact = kl["exact", torch.float32]
        effect[name] = {"mean fp32 exact KL": exact.mean().item()} | {
            f"{mode} {str(dtype).split('.')[-1]}": f"mean |diff| {(value - exact).abs().mean().item():.2e}, "
                                                   f"max {(value - exact).abs().max().item():.2e}"
            for (mode, dtype), value in kl.items() if (mode, dtype) != ("exact", torch.float32)}
    return effect


def _table_row(name: str, values: dict[str, list[float]], unit: str, scale: float = 1.0) -> str:
    medians = {mode: statistics.median(values[mode]) / scale for mode in MODES}
    return (f"| {name} | {medians['exact']:.3f} {unit} | {medians['hidden']:.3f} {unit} | "
            f"{medians['hidden'] / medians['exact']:.3f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2, help="timed rollouts per mode (after a warm-up)")
    parser.add_argument("--learn-reps", type=int, default=5, help="timed learner passes per mode (after a warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    quiet_progress_bars_off_a_terminal()  # a log file gets whole lines, no '\r' bar frames
    torch.set_num_threads(args.threads)
    teacher_dir, student_dir = smollm2_teacher_and_student(REPO / "artifacts")
    teacher, student = load_causal_lm(teacher_dir), load_causal_lm(student_dir)
    started = time.perf_counter()
    head = load_lm_head(teacher_dir)
    print(f"learner head {tuple(head.weight.shape)} read from {teacher_dir} in {time.perf_counter() - started:.2f} s "
          f"({head.weight.numel() * 4 / 2**20:.1f} MiB fp32)")
    prompt_ids, prompt_mask = chat_prompts(load_tokenizer(student_dir), args.batch_size, args.prompt_len)
    rollout_s = {mode: [] for mode in MODES}
    learn_s = {mode: [] for mode in MODES}
    rollouts, kls = {}, {}
    # Repetition 0 warms up both modes and is not counted; the order flips every repetition.
    for rep in range(args.reps + 1):
        for mode in MODES if rep % 2 else reversed(MODES):
            sampling, rollouts[mode], seconds = sample(student, teacher, prompt_ids, prompt_mask, mode, 0, args)
            rollout_s[mode] += [seconds] if rep else []
            print(f"rollout rep {rep} {mode}: {seconds:.1f} s", flush=True)
    assert torch.equal(rollouts["exact"].response_ids, rollouts["hidden"].response_ids), "modes sampled other tokens"
    for rep in range(args.learn_reps + 1):
        for mode in MODES if rep % 2 else reversed(MODES):
            sampling = SamplingConfig(alpha=0.2, max_new_tokens=args.new_tokens, teacher_dist=mode)
            seconds, kls[mode] = learn(student, sampling, rollouts[mode], head, args)
            learn_s[mode] += [seconds] if rep else []
            print(f"learn rep {rep} {mode}: {seconds:.1f} s", flush=True)
    nbytes = {key: {mode: [fn(rollouts[mode])] for mode in MODES} for key, fn in (
        ("teacher signal", signal_bytes), ("rollout tensors", tensor_bytes),
        ("rollout pickled", lambda r: len(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL))))}
    print(f"\nbatch {args.batch_size} x {args.new_tokens} new tokens, alpha 0.2, {args.threads} thread(s); medians of "
          f"{args.reps} rollouts and {args.learn_reps} learner passes per mode, interleaved; ratio = hidden / exact")
    print("| | exact | hidden | hidden / exact |\n|---|---|---|---|")
    print(_table_row("rollout (sample_rollouts)", rollout_s, "s"))
    print(_table_row("learner (ppo_round, 1 epoch)", learn_s, "s"))
    for key, values in nbytes.items():
        print(_table_row(key, values, "MiB", 2**20))
    print(f"single/kl: exact {kls['exact']:.6f}, hidden {kls['hidden']:.6f}")
    print("\nbf16 signals, per-token single-step KL against fp32 exact:")
    for name, value in bf16_effect(student, teacher, head, prompt_ids, prompt_mask, args).items():
        print(f"  {name}: {value}")

if __name__ == "__main__":
    main()
