"""The MiniLLM estimator is unbiased for the sequence-level reverse KL.

For α = 0 and the paper's variant (γ = 1, reward-to-go that excludes r_t, no whitening, no
clipping, first PPO epoch) the policy-gradient term plus the single-step term is an unbiased
estimate of ∇θ KL(q_θ ‖ p) over whole responses:

    ∇ KL = E_y~q [ Σ_t ∇log q(y_t) · Σ_{k>t} (log q(y_k) − log p(y_k)) ]   (the PG term)
         + E_y~q [ Σ_t ∇ KL(q(·|y_<t) ‖ p(·|y_<t)) ]                       (the single-step term)

The test enumerates every response of a tiny model (vocab 5, ≤ 3 new tokens) to get the exact
gradient, averages the estimator's gradient over many sampled rollouts, and checks agreement
with a z-test on the Monte-Carlo standard error. Length normalisation is switched off here
because the normalised estimator targets a different (length-normalised) objective; the test
also shows it detects a biased estimator (PG without the single-step term).
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from exact import reverse_kl
from minillm_rl.algorithm.advantages import AdvantageConfig, compute_advantages
from minillm_rl.algorithm.chunked_vocab import token_logprobs
from minillm_rl.algorithm.forward import response_logits
from minillm_rl.algorithm.losses import policy_loss, single_step_loss
from minillm_rl.algorithm.sampler import SamplingConfig, sample_rollouts

VOCAB, EOS, HORIZON = 5, 4, 3
PROMPT = [1, 2]
NUM_CHUNKS, CHUNK_SIZE = 20, 1000
# A coordinate of the Monte-Carlo mean may sit this many standard errors from the exact value.
# With ~a few hundred coordinates, |z| > 5 under the null has probability < 1e-4.
Z_MAX = 5.0
# ... and the whole vector within this relative error (measured: ~0.3% at this sample size).
REL_TOL = 0.03


def _tiny_lm(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # A large init makes the distributions peaked, so teacher and student differ and the KL
    # gradient stands out from Monte-Carlo noise.
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                     initializer_range=0.6, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     eos_token_id=EOS, bos_token_id=EOS)
    return GPT2LMHeadModel(cfg).eval()


def _exact_kl_and_grad(student, teacher) -> tuple[float, torch.Tensor]:
    student.zero_grad()
    kl = reverse_kl(student, teacher, PROMPT, VOCAB, EOS, HORIZON)
    kl.backward()
    return kl.item(), _flat_grad(student)


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().flatten() for p in model.parameters()])


def _estimator_grad(student, teacher, generator, with_single_step: bool) -> torch.Tensor:
    """Gradient of (L_pg + L_single) for one batch of rollouts, scaled from a mean over valid
    tokens back to a mean over sequences (the KL is a sum over each sequence's tokens)."""
    prompt_ids = torch.tensor([PROMPT] * CHUNK_SIZE)
    rollout = sample_rollouts(
        student, teacher, prompt_ids, torch.ones_like(prompt_ids),
        # Lazy mixing (the default): at alpha 0 the student decodes alone and the teacher scores
        # the responses in its one catch-up forward.
        SamplingConfig(alpha=0.0, max_new_tokens=HORIZON, teacher_dist="exact", mixing="lazy"),
        eos_token_id=EOS, pad_token_id=0, generator=generator,
    )
    adv_cfg = AdvantageConfig.paper()
    adv_cfg.length_normalize = False
    adv_cfg.reward_scaling = 1.0
    adv_cfg.reward_clip = float("inf")
    advantages, _ = compute_advantages(rollout, adv_cfg)

    student.zero_grad()
    logits = response_logits(student, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                             rollout.response_mask)
    logprobs = token_logprobs(logits, rollout.response_ids)
    weights = torch.ones_like(logprobs)  # α = 0: w ≡ 1
    loss, _ = policy_loss(logprobs, rollout.student_logprobs, weights, advantages, rollout.response_mask,
                          clip_eps=1e9)
    if with_single_step:
        single, _ = single_step_loss(logits, rollout, rollout.response_mask)
        loss = loss + single
    tokens_per_sequence = rollout.response_mask.sum() / CHUNK_SIZE
    (loss * tokens_per_sequence).backward()
    return _flat_grad(student)


def _monte_carlo(student, teacher, with_single_step: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    grads = torch.stack([_estimator_grad(student, teacher, generator, with_single_step)
                         for _ in range(NUM_CHUNKS)])
    return grads.mean(0), grads.std(0) / NUM_CHUNKS**0.5


def _z_scores(mean: torch.Tensor, exact: torch.Tensor, stderr: torch.Tensor) -> torch.Tensor:
    """Deviation in standard errors. Some coordinates have an exact gradient of 0 in theory (a
    key bias cancels in the softmax) and float32 round-off there dwarfs a ~0 MC spread, so the
    error scale is floored at float32 resolution of the gradient's magnitude."""
    floor = 1e-5 * exact.abs().max()
    return (mean - exact) / torch.sqrt(stderr**2 + floor**2)


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(2)
    return _tiny_lm(seed=0), _tiny_lm(seed=1)


def test_mc_gradient_matches_exact_reverse_kl_gradient(models):
    student, teacher = models
    kl, exact = _exact_kl_and_grad(student, teacher)
    assert kl > 0.1, "teacher and student must differ for the test to mean anything"

    mean, stderr = _monte_carlo(student, teacher, with_single_step=True)
    z = _z_scores(mean, exact, stderr)
    rel_err = ((mean - exact).norm() / exact.norm()).item()
    print(f"exact KL={kl:.4f}  |grad|={exact.norm():.4f}  rel.err={rel_err:.4f}  max|z|={z.abs().max():.2f}")
    assert z.abs().max() < Z_MAX
    assert rel_err < REL_TOL


def test_the_check_has_power_against_a_biased_estimator(models):
    """Excluding r_t from the reward-to-go is only unbiased with the single-step term added back."""
    student, teacher = models
    _, exact = _exact_kl_and_grad(student, teacher)
    mean, stderr = _monte_carlo(student, teacher, with_single_step=False)
    rel_err = ((mean - exact).norm() / exact.norm()).item()
    z = _z_scores(mean, exact, stderr)
    print(f"biased estimator: rel.err={rel_err:.4f}  max|z|={z.abs().max():.2f}")
    assert rel_err > 3 * REL_TOL or z.abs().max() > 3 * Z_MAX
