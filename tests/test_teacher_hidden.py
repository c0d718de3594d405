"""The ``hidden`` teacher signal: the workers ship the teacher's final hidden states ``[B, T, d]``
and the learner recomputes the teacher's distribution with its frozen LM head.

- the chunked kernels against float64 autograd through the materialised teacher distribution
  (values and gradients; unchunked, and chunk sizes that divide neither ``B * T`` nor ``V``), and
  against the exact-mode kernels;
- the single-step and PT terms through the model: same losses and parameter gradients as exact mode;
- the sampler's and the worker's recorded hidden states reproduce the exact mode's teacher distribution;
- the learner's head, read from the checkpoint files by name, is the model's (tied, untied, biased);
- a teacher whose logits are not its linear head's output is refused in one line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, GPTJConfig, GPTJForCausalLM

from conftest import make_tiny_lm
from minillm_rl.algorithm.advantages import AdvantageConfig
from minillm_rl.algorithm.batching import left_pad
from minillm_rl.algorithm.chunked_vocab import (
    reverse_kl_to_teacher,
    reverse_kl_to_teacher_hidden,
    soft_cross_entropy,
    soft_cross_entropy_hidden,
)
from minillm_rl.algorithm.ppo import MiniLLMLossConfig, PretrainBatch, minillm_micro_batch_loss, \
    pretrain_micro_batch_loss
from minillm_rl.algorithm.sampler import SamplingConfig, sample_rollouts
from minillm_rl.algorithm.teacher_head import HiddenTeacher, TeacherHead
from minillm_rl.models import declared_logit_transform, load_lm_head, load_model_config, resolve_teacher_dist
from minillm_rl.runtime.rollout.worker import RolloutWorker

torch.set_num_threads(1)

B, T, V, D = 3, 5, 37, 6
EOS = 1
# (positions per block, vocabulary columns per chunk): everything at once; blocks that split
# rows / span rows, with vocabulary chunks that do not divide V = 37 (7, 5, 36, 1).
CHUNKS = [(1000, 1000), (2, 7), (7, 5), (11, 36), (4, 1)]


def _inputs(seed: int, bias: bool):
    """Student logits (a strided float64 leaf, like the learner's response slice), teacher hidden
    states, a head and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + 2, V, generator=g, dtype=torch.float64) * 2
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    head = TeacherHead(torch.randn(V, D, generator=g, dtype=torch.float64),
                       torch.randn(V, generator=g, dtype=torch.float64) if bias else None)
    upstream = torch.randn(B, T, generator=g, dtype=torch.float64)
    return full[:, 1 : 1 + T].requires_grad_(), hidden, head, upstream


def _value_and_grad(fn, logits, upstream):
    logits.grad = None
    value = fn(logits)
    (value * upstream.to(value.dtype)).sum().backward()
    return value.detach(), logits.grad.detach().clone()


def _teacher_logprobs64(hidden, head):
    logits = hidden @ head.weight.T + (0 if head.bias is None else head.bias)
    return torch.log_softmax(logits, dim=-1)


def _reverse_kl64(z, teacher_logprobs):
    return (torch.softmax(z, -1) * (torch.log_softmax(z, -1) - teacher_logprobs)).sum(-1)


def _soft_ce64(z, teacher_logprobs):
    return -(teacher_logprobs.exp() * torch.log_softmax(z, -1)).sum(-1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("positions, vocab_chunk", CHUNKS)
@pytest.mark.parametrize("hidden_fn, dense_fn, reference", [
    (reverse_kl_to_teacher_hidden, reverse_kl_to_teacher, _reverse_kl64),
    (soft_cross_entropy_hidden, soft_cross_entropy, _soft_ce64),
])
def test_hidden_kernels_equal_the_exact_mode_in_float64(hidden_fn, dense_fn, reference, positions, vocab_chunk,
                                                        bias):
    logits, hidden, head, upstream = _inputs(7, bias)
    teacher = HiddenTeacher(hidden, head)
    teacher_logprobs = _teacher_logprobs64(hidden, head)
    got, got_grad = _value_and_grad(lambda z: hidden_fn(z, teacher, positions, vocab_chunk), logits, upstream)
    want, want_grad = _value_and_grad(lambda z: reference(z, teacher_logprobs), logits, upstream)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-12)
    # The exact-mode kernel computes in float32: the same up to float32 rounding.
    dense, dense_grad = _value_and_grad(lambda z: dense_fn(z, teacher_logprobs), logits, upstream)
    torch.testing.assert_close(dense.double(), got, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_grad, got_grad, atol=1e-5, rtol=1e-5)


def test_hidden_kernels_in_float32_with_bf16_hidden_states():
    """float32 logits and bf16 hidden states (the shipped dtype) compute in float32: the value is
    the exact KL of the distribution the bf16 hidden states define, and stays >= 0."""
    logits, hidden, head, upstream = _inputs(3, bias=True)
    logits32 = logits.detach().float().requires_grad_()
    hidden16 = hidden.to(torch.bfloat16)
    teacher = HiddenTeacher(hidden16, head.to(dtype=torch.float32))
    got, got_grad = _value_and_grad(lambda z: reverse_kl_to_teacher_hidden(z, teacher, 4, 9), logits32, upstream)
    assert got.dtype == torch.float32 and bool((got >= -1e-6).all())
    teacher_logprobs = _teacher_logprobs64(hidden16.double(), head)
    want, want_grad = _value_and_grad(lambda z: _reverse_kl64(z, teacher_logprobs), logits, upstream)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad, atol=2e-5, rtol=1e-5)


def test_bad_hidden_inputs_are_one_line_errors():
    logits, hidden, head, _ = _inputs(1, bias=False)
    with pytest.raises(ValueError, match=r"teacher hidden must have shape \(3, 5, 6\), got \(3, 4, 6\)"):
        reverse_kl_to_teacher_hidden(logits, HiddenTeacher(hidden[:, :4], head))
    with pytest.raises(ValueError, match="the teacher head has 36 vocabulary rows, the student logits 37"):
        soft_cross_entropy_hidden(logits, HiddenTeacher(hidden, TeacherHead(head.weight[:36])))
    with pytest.raises(ValueError, match="chunk_size must be >= 1 or None"):
        reverse_kl_to_teacher_hidden(logits, HiddenTeacher(hidden, head), 4, 0)


# --------------------------------------------------------------------------------------------
# Through the models: sampler, single-step term, PT term
# --------------------------------------------------------------------------------------------

def _pair(arch: str, vocab: int = 40):
    """A float64 student and teacher of ``arch`` (hidden size 16)."""
    teacher = make_tiny_lm(arch, vocab, num_layers=2, seed=0, init_std=0.4).double()
    student = make_tiny_lm(arch, vocab, num_layers=1, seed=1, init_std=0.4).double()
    return student, teacher


def _sample(student, teacher, mode: str, alpha: float, dtype=torch.float64):
    prompt_ids, prompt_mask = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13]], pad_token_id=0)
    cfg = SamplingConfig(alpha=alpha, max_new_tokens=6, teacher_dist=mode, teacher_dist_dtype=dtype)
    return cfg, sample_rollouts(student, teacher, prompt_ids, prompt_mask, cfg, eos_token_id=EOS, pad_token_id=0,
                                generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_sampled_hidden_states_reproduce_the_exact_teacher_distribution(arch, alpha):
    """Same seed, same tokens and records; the head applied to the recorded hidden states gives
    the distribution exact mode recorded (mixed decoding, and the alpha = 0 scoring forward)."""
    student, teacher = _pair(arch)
    _, exact = _sample(student, teacher, "exact", alpha)
    _, hidden = _sample(student, teacher, "hidden", alpha)
    assert exact.teacher_hidden is None and hidden.teacher_dist_logprobs is None
    for name in ("response_ids", "response_mask", "student_logprobs", "teacher_logprobs", "teacher_logprobs_raw"):
        torch.testing.assert_close(getattr(hidden, name), getattr(exact, name), atol=0, rtol=0, msg=name)
    assert hidden.teacher_hidden.shape == (*hidden.response_ids.shape, 16)
    valid = hidden.response_mask > 0
    assert bool((hidden.teacher_hidden[~valid] == 0).all())
    recomputed = _teacher_logprobs64(hidden.teacher_hidden, TeacherHead.from_model(teacher, torch.float64))
    # exact mode ships log_softmax of the float64 logits rounded to float32 in the sampler.
    torch.testing.assert_close(recomputed[valid], exact.teacher_dist_logprobs[valid].double(), atol=1e-5, rtol=0)


def test_hidden_states_are_shipped_in_the_configured_dtype():
    student, teacher = _pair("llama")
    _, rollout = _sample(student.float(), teacher.float(), "hidden", 0.2, dtype=torch.bfloat16)
    assert rollout.teacher_hidden.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_single_step_and_pt_terms_and_their_gradients_equal_exact_mode(arch):
    """``L_pg + L_single`` of a micro-batch, and ``L_pt`` on corpus blocks, from hidden states +
    head equal exact mode's (float64 models), and so do their gradients w.r.t. the student's
    parameters; without the head the hidden rollout is refused."""
    student, teacher = _pair(arch)
    head = TeacherHead.from_model(teacher, torch.float64)
    results = {}
    blocks = torch.randint(2, 40, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        teacher_logprobs = torch.log_softmax(teacher(input_ids=blocks).logits[:, :-1], -1)
        teacher_hidden = teacher.base_model(input_ids=blocks).last_hidden_state[:, :-1]
    for mode in ("exact", "hidden"):
        cfg, rollout = _sample(student, teacher, mode, 0.2)
        student.zero_grad(set_to_none=True)
        loss, stats = minillm_micro_batch_loss(student, rollout, cfg, AdvantageConfig(), MiniLLMLossConfig(),
                                               teacher_head=head if mode == "hidden" else None)
        scores = {"teacher_hidden": teacher_hidden} if mode == "hidden" else {"teacher_logprobs": teacher_logprobs}
        pt, pt_stats = pretrain_micro_batch_loss(student, PretrainBatch(blocks, **scores), 0.5,
                                                 head if mode == "hidden" else None)
        (loss + pt).backward()
        results[mode] = (loss.item(), stats["single/kl"], pt.item(), pt_stats["soft_ce"],
                         {n: p.grad.clone() for n, p in student.named_parameters()})
        if mode == "hidden":
            with pytest.raises(ValueError, match="pass teacher_head"):
                minillm_micro_batch_loss(student, rollout, cfg, AdvantageConfig(), MiniLLMLossConfig())
            with pytest.raises(ValueError, match="pass teacher_head"):
                pretrain_micro_batch_loss(student, PretrainBatch(blocks, **scores), 0.5)
    exact, hidden = results["exact"], results["hidden"]
    assert exact[1] > 1e-3 and exact[3] > 1e-3  # the terms are there to compare
    for want, got in zip(exact[:4], hidden[:4]):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    for name, want in exact[4].items():
        torch.testing.assert_close(hidden[4][name], want, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_worker_scores_hidden_states_that_reproduce_its_log_probs():
    """PT / KD scoring: hidden states (zero at padding, last ``N`` positions) whose head gives the
    worker's own full log-probs."""
    teacher = make_tiny_lm("llama", 40, seed=0, init_std=0.4)
    worker = RolloutWorker(lambda: teacher, lambda: make_tiny_lm("llama", 40, num_layers=1, seed=1))
    input_ids = torch.randint(2, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding
    full = worker.score_teacher(input_ids, attention_mask)
    hidden = worker.score_teacher(input_ids, attention_mask, 0, 0, torch.float32)
    tail = worker.score_teacher(input_ids, attention_mask, 0, 3, torch.bfloat16)
    assert hidden.logprobs is None and hidden.hidden.shape == (2, 6, 16) and tail.hidden.shape == (2, 3, 16)
    assert tail.hidden.dtype == torch.bfloat16
    assert bool((hidden.hidden[1, :2] == 0).all())
    recomputed = torch.log_softmax(TeacherHead.from_model(teacher).logits(hidden.hidden.flatten(0, 1)), -1)
    valid = attention_mask.flatten() > 0
    torch.testing.assert_close(recomputed[valid], full.logprobs.flatten(0, 1)[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(tail.hidden.float(), hidden.hidden[:, -3:], atol=0.02, rtol=0.01)


# --------------------------------------------------------------------------------------------
# The learner's head
# --------------------------------------------------------------------------------------------

def _biased_gptj(vocab: int = 40):
    torch.manual_seed(0)
    config = GPTJConfig(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, rotary_dim=4, n_positions=32,
                        bos_token_id=0, eos_token_id=EOS)
    return GPTJForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama", "gptj"])
@pytest.mark.parametrize("safe_serialization", [True, False])
def test_learner_reads_exactly_the_models_head_from_its_files(tmp_path, arch, safe_serialization):
    """GPT-2 and OPT tie the head to the embedding (checkpoints store it under the embedding's
    name), Llama here does not, GPT-J's head has a bias; safetensors and .bin files."""
    model = _biased_gptj() if arch == "gptj" else make_tiny_lm(arch, 40, seed=3)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    head = load_lm_head(tmp_path)
    reference = model.get_output_embeddings()
    assert head.weight.dtype == torch.float32 and torch.equal(head.weight, reference.weight)
    assert (head.bias is None) == (reference.bias is None)
    if reference.bias is not None:
        assert torch.equal(head.bias, reference.bias)


def test_a_checkpoint_without_the_head_is_a_one_line_error(tmp_path):
    from safetensors.torch import save_file

    model = make_tiny_lm("llama", 40)
    model.config.save_pretrained(tmp_path)
    save_file({name: t for name, t in model.state_dict().items() if name != "lm_head.weight"},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"no LM head weight in its checkpoint files .* \(looked for lm_head.weight\); "
                                         r"use sampling.teacher_dist=exact"):
        load_lm_head(tmp_path)


# --------------------------------------------------------------------------------------------
# Refusal of teachers whose logits are not their linear head's output
# --------------------------------------------------------------------------------------------

def _softcapped_teacher(vocab: int) -> Gemma2ForCausalLM:
    """A tiny Gemma 2: its logits are ``30 tanh(head(h) / 30)``, not ``head(h)``."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
                          pad_token_id=0, bos_token_id=2, eos_token_id=EOS)
    return Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_sampler_and_worker_refuse_a_soft_capped_teacher_in_one_line(alpha):
    teacher = _softcapped_teacher(40)
    student = make_tiny_lm("llama", 40, num_layers=1, seed=1)
    with pytest.raises(ValueError) as refused:
        _sample(student, teacher, "hidden", alpha, dtype=torch.float32)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("sampling.teacher_dist='hidden' needs a teacher whose logits")
    assert "use sampling.teacher_dist=exact" in message
    _sample(student, teacher, "exact", alpha, dtype=torch.float32)  # exact mode is unaffected
    worker = RolloutWorker(lambda: teacher, lambda: student)
    ids = torch.randint(2, 40, (1, 5))
    with pytest.raises(ValueError, match="logits it returns differ"):
        worker.score_teacher(ids, torch.ones_like(ids), 0, 0, torch.float32)


def test_auto_resolves_by_the_teachers_config_and_hidden_is_refused_for_transformed_logits(tmp_path):
    _softcapped_teacher(40).config.save_pretrained(tmp_path / "gemma2")
    make_tiny_lm("llama", 40).config.save_pretrained(tmp_path / "llama")
    capped = declared_logit_transform(load_model_config(tmp_path / "gemma2"))
    assert capped == "final_logit_softcapping=30.0"
    assert declared_logit_transform(load_model_config(tmp_path / "llama")) is None
    assert resolve_teacher_dist("auto", capped) == "exact" and resolve_teacher_dist("auto", None) == "hidden"
    assert resolve_teacher_dist("topk", capped) == "topk"
    with pytest.raises(ValueError, match=r"declares final_logit_softcapping=30.0 .*; use 'exact' or 'auto'"):
        resolve_teacher_dist("hidden", capped)


def test_cli_refuses_hidden_for_a_soft_capped_teacher_before_writing_anything(tmp_path):
    """Bad input: one line, exit 2, the output directory never created."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_assets import tiny_tokenizer, write_assets

    assets = write_assets(tmp_path / "assets")
    tokenizer = tiny_tokenizer()
    _softcapped_teacher(len(tokenizer)).save_pretrained(tmp_path / "gemma2")
    tokenizer.save_pretrained(tmp_path / "gemma2")
    out = tmp_path / "run"
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "minillm_rl.cli", "train", "--config", str(repo / "launch/recipes/tiny-e2e.yaml"),
         f"model.teacher={tmp_path / 'gemma2'}", f"model.student={assets['student']}", f"data.train={assets['data']}",
         f"output.dir={out}", "runtime.num_learners=1", "sampling.teacher_dist=hidden"],
        cwd=repo, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("minillm-rl: error:")]
    assert len(errors) == 1 and "final_logit_softcapping=30.0" in errors[0] and "Traceback" not in result.stderr
    assert not out.exists()
