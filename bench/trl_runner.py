"""One TRL distillation trainer at the benchmark's settings; run inside a throwaway TRL venv.

``bench/bench_runtime.py`` starts this script with the venv's interpreter (TRL is not a project
dependency) and reads the last stdout line, one JSON object:
``{"trainer", "trl_version", "samples_per_s", "step_seconds", "logged_lengths"}`` or, when the
trainer cannot run here, ``{"trainer", "error": "<one line>"}``.

Settings, identical to our side of the benchmark: on-policy (the student samples every
completion, no teacher mixing), one optimizer update per batch of ``--batch-size`` prompts,
exactly ``--new-tokens`` sampled tokens per completion (``min_new_tokens`` masks EOS until the
cap), temperature 1 / top-k 0 / top-p 1, fp32 (TRL's configs default to bf16), no gradient
checkpointing (ours does not use it), AdamW betas (0.9, 0.95), constant LR, gradient clip 1.

    python bench/trl_runner.py {distillation,minillm} --student DIR --teacher DIR --prompts FILE.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


def step_timer_callback(transformers):
    """A ``TrainerCallback`` recording the wall time between consecutive ``on_step_end`` events
    (generation, teacher scoring, loss, update, logging: one whole training step each)."""

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.last = None
            self.step_seconds: list[float] = []
            self.logged_lengths: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step_seconds.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            # Both trainers log the mean completion length; it proves min_new_tokens held.
            for key, value in (logs or {}).items():
                if key.endswith("mean_length") and "terminated" not in key:
                    self.logged_lengths.append(float(value))

    return StepTimer()


def common_config_kwargs(args, output_dir: str) -> dict:
    """TrainingArguments shared by both trainers (see the module docstring for why each is set)."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "weight_decay": 1e-6,
        "max_grad_norm": 1.0,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "max_completion_length": args.new_tokens,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "generation_kwargs": {"min_new_tokens": args.new_tokens},
        "shuffle_dataset": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": args.seed,
    }


def build_trainer(args, dataset, callback):
    """The TRL trainer named by ``args.trainer`` over the in-memory prompt ``dataset``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.student, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype="float32")
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype="float32")
    output_dir = tempfile.mkdtemp(prefix=f"trl-{args.trainer}-")
    common = common_config_kwargs(args, output_dir)
    if args.trainer == "distillation":
        from trl import DistillationConfig, DistillationTrainer

        # beta = 1: the generalized JSD becomes the reverse KL KL(q || p), token-level over the
        # full vocabulary, on completions the student sampled (this trainer is always on-policy).
        config = DistillationConfig(**common, beta=1.0)
        return DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                   processing_class=tokenizer, callbacks=[callback])
    from trl.experimental.minillm import MiniLLMConfig, MiniLLMTrainer

    # One completion per prompt, one generation per update, one update per generation: the
    # on-policy MiniLLM round of batch size args.batch_size; gamma as our default (algorithm.md §3.6).
    config = MiniLLMConfig(**common, num_generations=1, steps_per_generation=1, num_iterations=1, beta=0.0,
                           epsilon=0.2, gamma=0.95, single_step_decomposition=True, rkl_advantage=True,
                           length_normalization=True, kd_temperature=1.0)
    return MiniLLMTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[callback])


def run(args) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    with open(args.prompts, encoding="utf-8") as handle:
        user_texts = json.load(handle)
    needed = args.batch_size * args.steps
    if len(user_texts) < needed:
        raise ValueError(f"--prompts {args.prompts}: {len(user_texts)} prompts, need {needed} "
                         f"(batch {args.batch_size} x {args.steps} steps)")
    dataset = datasets.Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": text}] for text in user_texts[:needed]]})
    callback = step_timer_callback(transformers)
    trainer = build_trainer(args, dataset, callback)
    trainer.train()
    if len(callback.step_seconds) != args.steps:
        raise RuntimeError(f"timed {len(callback.step_seconds)} steps, expected {args.steps}")
    timed = callback.step_seconds[args.warmup_steps:]
    return {
        "trainer": args.trainer,
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "samples_per_s": args.batch_size * len(timed) / sum(timed),
        "step_seconds": callback.step_seconds,
        "logged_lengths": callback.logged_lengths,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trainer", choices=["distillation", "minillm"])
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of user-turn texts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="training steps, warm-up included")
    parser.add_argument("--warmup-steps", type=int, default=1, help="leading steps left out of samples/s")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps={args.warmup_steps} must be in [0, --steps={args.steps})")
    try:
        result = run(args)
    except Exception as err:  # noqa: BLE001 - any failure is one line in the benchmark table
        message = " ".join(str(err).split()) or type(err).__name__
        print(json.dumps({"trainer": args.trainer, "error": f"{type(err).__name__}: {message}"[:300]}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
