"""The single-process training loops (the code path the DeepSpeed learners share)."""

from __future__ import annotations

import pytest
import torch

from exact import reverse_kl
from minillm_rl.algorithm.advantages import AdvantageConfig
from minillm_rl.algorithm.batching import collate_supervised, left_pad
from minillm_rl.algorithm.sampler import SamplingConfig, sample_rollouts
from minillm_rl.config import OptimConfig
from minillm_rl.algorithm.engine import TorchEngine, lr_factor
from minillm_rl.algorithm.losses import pt_loss
from minillm_rl.algorithm.ppo import (
    MiniLLMLossConfig,
    PretrainBatch,
    minillm_micro_batch_loss,
    ppo_round,
)
from minillm_rl.algorithm.supervised import supervised_micro_batch_loss, validation_loss

EOS = 1  # the tiny models' eos_token_id (tests/conftest.py)


def test_first_epoch_ratio_is_the_importance_weight(tiny_lm):
    """Before any update q_θ = q_old, so ρ = w exactly — only if the learner recomputes log q
    under the sampler's temperature/top-k processing and the same positions."""
    torch.manual_seed(0)
    student, teacher = tiny_lm("llama", 32, seed=0, init_std=0.3), tiny_lm("llama", 32, seed=1, init_std=0.3)
    prompt_ids, prompt_mask = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13]], pad_token_id=0)
    sampling = SamplingConfig(alpha=0.3, temperature=0.8, top_k=8, max_new_tokens=6)
    # Seed 1: a draw with teacher-drawn tokens outside the student's top-k (11 of 18 tokens).
    rollout = sample_rollouts(student, teacher, prompt_ids, prompt_mask, sampling, eos_token_id=EOS,
                              pad_token_id=0, generator=torch.Generator().manual_seed(1))
    loss, stats = minillm_micro_batch_loss(student, rollout, sampling, AdvantageConfig(), MiniLLMLossConfig())
    assert torch.isfinite(loss)
    # top-k + mixing: some teacher-drawn tokens lie outside the student's processed support
    # (w = 0); they must not turn the loss or its gradient into NaN.
    assert stats["pg/outside_student_support"] > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert abs(stats["pg/ratio_mean"] - stats["w/mean"]) < 1e-5
    assert stats["pg/approx_kl"] < 1e-6
    assert 0 < stats["w/max"] <= 1 / (1 - sampling.alpha) + 1e-6


def test_minillm_rounds_reduce_the_exact_reverse_kl(tiny_lm):
    """Reference settings (α = 0.2, γ = 0.95, length-normalised, whitened, clipped): a few rounds
    of sampling + PPO epochs must lower the sequence-level KL(q ‖ p), computed exactly."""
    vocab, horizon, prompt = 5, 3, [2, 3]
    student, teacher = tiny_lm("gpt2", vocab, seed=0, init_std=0.5), tiny_lm("gpt2", vocab, seed=1, init_std=0.5)
    sampling = SamplingConfig(alpha=0.2, max_new_tokens=horizon)
    engine = TorchEngine(student, OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0))
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.tensor([prompt] * 64)
    with torch.no_grad():
        kl_before = reverse_kl(student, teacher, prompt, vocab, EOS, horizon).item()
    for version in range(12):
        rollout = sample_rollouts(student, teacher, prompt_ids, torch.ones_like(prompt_ids), sampling,
                                  eos_token_id=EOS, pad_token_id=0, generator=generator, policy_version=version)
        history = ppo_round(engine, rollout, sampling, AdvantageConfig(), MiniLLMLossConfig(),
                            ppo_epochs=2, micro_batch_size=32, generator=generator)
        assert len(history) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    with torch.no_grad():
        kl_after = reverse_kl(student, teacher, prompt, vocab, EOS, horizon).item()
    assert kl_before > 0.5
    assert kl_after < 0.6 * kl_before, (kl_before, kl_after)


@pytest.mark.parametrize("teacher_scores", ["exact", "topk", "none"])
def test_pt_term_adds_lm_coef_times_its_loss_to_the_step_gradient(tiny_lm, teacher_scores):
    """One PPO step with a PT batch follows the gradient of ``L_pg + L_single + lm_coef * L_pt``,
    the PT term on the corpus blocks with the teacher's (exact or top-K) distribution, computed
    here separately with the same losses."""
    student, teacher = tiny_lm("llama", 32, seed=0, init_std=0.3), tiny_lm("llama", 32, seed=1, init_std=0.3)
    prompt_ids, prompt_mask = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13], [4]], pad_token_id=0)
    sampling = SamplingConfig(alpha=0.2, max_new_tokens=5)
    rollout = sample_rollouts(student, teacher, prompt_ids, prompt_mask, sampling, eos_token_id=EOS,
                              pad_token_id=0, generator=torch.Generator().manual_seed(0))
    blocks = torch.randint(2, 32, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher_logprobs = torch.log_softmax(teacher(input_ids=blocks).logits[:, :-1].float(), -1)
    topk = torch.topk(teacher_logprobs, 6, dim=-1)
    batch = {"exact": PretrainBatch(blocks, teacher_logprobs),
             "topk": PretrainBatch(blocks, None, topk.values, topk.indices),
             "none": PretrainBatch(blocks)}[teacher_scores]
    loss_cfg = MiniLLMLossConfig(lm_coef=0.7, kd_ratio=0.4)

    student.zero_grad()
    loss, _ = minillm_micro_batch_loss(student, rollout, sampling, AdvantageConfig(), loss_cfg)
    logits = student(input_ids=blocks).logits[:, :-1]
    teacher_kwargs = {"exact": {"teacher_logprobs": teacher_logprobs},
                      "topk": {"teacher_topk": (topk.values, topk.indices)}, "none": {}}[teacher_scores]
    pt_value, _ = pt_loss(logits, blocks[:, 1:], kd_ratio=0.4 if teacher_scores != "none" else 0.0, **teacher_kwargs)
    (loss + 0.7 * pt_value).backward()
    want = {name: p.grad.clone() for name, p in student.named_parameters()}
    want_loss = (loss + 0.7 * pt_value).item()
    student.zero_grad(set_to_none=True)

    engine = TorchEngine(student, OptimConfig(lr=1e-3, grad_clip=1e9))
    got, asked = {}, []
    step = engine.step
    engine.step = lambda: (got.update({n: p.grad.clone() for n, p in student.named_parameters()}), step())[1]
    history = ppo_round(engine, rollout, sampling, AdvantageConfig(), loss_cfg, ppo_epochs=1, micro_batch_size=4,
                        generator=torch.Generator().manual_seed(2), pretrain=lambda i: asked.append(i) or batch)
    assert asked == [0]
    assert history[0]["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert history[0]["pt/loss"] == pytest.approx(pt_value.item(), rel=1e-5)
    assert ("pt/soft_ce" in history[0]) == (teacher_scores != "none")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_sft_fits_the_responses_and_validation_loss_is_token_weighted(tiny_lm):
    model = tiny_lm("opt", 24, seed=0)
    prompts = [[4, 5, 6], [7, 8], [9, 10, 11, 12]]
    responses = [[13, 14, EOS], [15, EOS], [16, 17, 18, EOS]]
    batch = collate_supervised(prompts, responses, pad_token_id=0)
    singles = [collate_supervised([p], [r], pad_token_id=0) for p, r in zip(prompts, responses)]
    per_example = [supervised_micro_batch_loss(model, b)[0].item() for b in singles]
    weights = [len(r) for r in responses]
    expected = sum(w * l for w, l in zip(weights, per_example)) / sum(weights)
    assert abs(validation_loss(model, singles) - expected) < 1e-5
    assert abs(supervised_micro_batch_loss(model, batch)[0].item() - expected) < 1e-5

    engine = TorchEngine(model, OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.0))
    model.train()
    for _ in range(60):
        loss, _ = supervised_micro_batch_loss(engine, batch)
        engine.backward(loss)
        engine.step()
    model.eval()
    assert validation_loss(model, [batch]) < 0.2 * expected


def test_lr_schedule_warms_up_then_holds_or_decays():
    constant = OptimConfig(warmup_steps=4, lr_schedule="constant")
    assert [lr_factor(s, constant) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = OptimConfig(warmup_steps=2, lr_schedule="cosine")
    factors = [lr_factor(s, cosine, total_steps=6) for s in range(7)]
    assert factors[:3] == [0.5, 1.0, 1.0] and abs(factors[4] - 0.5) < 1e-9 and factors[6] == 0.0
    linear = OptimConfig(warmup_steps=0, lr_schedule="linear")
    assert [lr_factor(s, linear, total_steps=4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(3, cosine)


def test_non_finite_gradient_skips_the_step(tiny_lm):
    model = tiny_lm("gpt2", 8)
    engine = TorchEngine(model, OptimConfig(lr=1e-2, warmup_steps=1))
    before = [p.detach().clone() for p in model.parameters()]
    batch = collate_supervised([[2, 3]], [[4, EOS]], pad_token_id=0)
    loss, _ = supervised_micro_batch_loss(engine, batch)
    engine.backward(loss * float("nan"))
    engine.step()
    assert engine.skipped_steps == 1 and engine.global_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
