"""Rollout worker and weight sync: payload checksums and buckets (pure), then one Ray actor.

The actor is compared against the same code run locally: rollouts against ``sample_rollouts``,
eval strings against ``generate_responses``, teacher scores against a direct forward. Faults:
a wrong or misshapen payload is refused with the old weights kept, a SIGKILLed actor comes back
unsynced and works after a re-sync, and a call slower than its timeout raises instead of hanging.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
from tiny_assets import word_tokenizer
import torch
from conftest import make_tiny_lm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from minillm_rl.algorithm.batching import left_pad
from minillm_rl.evaluation.protocol import EvalConfig, generate_responses
from minillm_rl.models import load_causal_lm, load_tokenizer
from minillm_rl.runtime.replay import make_replay_store_actor, take_blocking
from minillm_rl.algorithm.sampler import SamplingConfig, sample_rollouts
from minillm_rl.runtime.rollout.client import generate_texts_on_workers
from minillm_rl.runtime.rollout.worker import (
    LAUNCHER_ENV_VARS,
    UNSYNCED_VERSION,
    RolloutWorker,
    StaleWeights,
    broadcast_student_weights,
    call_with_timeout,
    make_rollout_worker,
)
from minillm_rl.runtime import weights
from minillm_rl.runtime.weights import WeightPayload, iter_buckets, load_payload, payload_checksum, state_dict_payload

# One xdist group (make test: --dist loadgroup): its tests share one Ray instance and its worker actor.
pytestmark = pytest.mark.xdist_group("test_worker")

ray = pytest.importorskip("ray")

PAD, EOS = 0, 1
WORDS = [f"w{i}" for i in range(29)]
VOCAB = 3 + len(WORDS)
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14], [15, 16]]
TIMEOUT_S = 60.0


def tied_student(seed: int = 2) -> LlamaForCausalLM:
    """A one-layer Llama whose LM head is its input embedding."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.5, tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=PAD,
                         eos_token_id=EOS)
    return LlamaForCausalLM(config).float().eval()


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """``model`` with seeded noise added to every parameter: a stand-in for a learner update."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def make_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS)


# ---------------------------------------------------------------- weight payloads (no Ray)

def test_tied_head_is_sent_once_and_checksum_is_stable():
    model = tied_student()
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    payload = state_dict_payload(model)
    assert payload.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in payload.tensors
    distinct_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedupes ties
    assert payload.num_bytes == distinct_bytes
    assert payload.num_bytes == sum(t.numel() * t.element_size() for t in state.values()) - VOCAB * 16 * 4

    checksum = payload_checksum(payload)
    assert checksum == payload_checksum(tied_student()) == payload_checksum(state)
    reordered = WeightPayload(dict(reversed(list(payload.tensors.items()))), payload.aliases)
    assert payload_checksum(reordered) == checksum
    flipped = {name: t.clone() for name, t in payload.tensors.items()}
    flipped["model.norm.weight"][3] = torch.nextafter(flipped["model.norm.weight"][3], torch.tensor(10.0))
    assert payload_checksum(WeightPayload(flipped, payload.aliases)) != checksum
    assert payload_checksum(WeightPayload(payload.tensors, {})) != checksum  # the tie is part of it


def test_checksum_of_chunked_tensors_sees_every_chunk_and_not_the_thread_count(monkeypatch):
    """Tensors over a chunk are hashed chunk by chunk on threads: a flipped byte in any chunk
    (the last, partial one included) changes the checksum, the thread count does not, and
    splitting the same bytes into other shapes does (the shape is hashed)."""
    monkeypatch.setattr(weights, "DIGEST_CHUNK_BYTES", 64)
    tensors = {"a": torch.randn(50), "b": torch.randn(7, 9), "c": torch.randn(3)}  # 200 B: 4 chunks
    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = payload_checksum(tensors)
        torch.set_num_threads(2)
        assert payload_checksum(tensors) == one_thread
    finally:
        torch.set_num_threads(previous_threads)
    for position in (0, 20, 49):  # first, middle and last (partial) chunk of "a"
        flipped = {**tensors, "a": tensors["a"].clone()}
        flipped["a"][position] = torch.nextafter(flipped["a"][position], torch.tensor(10.0))
        assert payload_checksum(flipped) != one_thread
    assert payload_checksum({**tensors, "b": tensors["b"].reshape(9, 7)}) != one_thread


def test_buckets_are_bounded_and_reassemble_the_payload():
    payload = state_dict_payload(tied_student())
    bucket_bytes = 2048
    buckets = list(iter_buckets(payload, bucket_bytes))
    assert len(buckets) > 2
    for bucket in buckets:
        assert bucket.num_bytes <= bucket_bytes or len(bucket.tensors) == 1
    names = [name for bucket in buckets for name in bucket.tensors]
    assert sorted(names) == sorted(payload.tensors) and len(names) == len(set(names))
    aliases = {alias: canonical for bucket in buckets for alias, canonical in bucket.aliases.items()}
    assert aliases == payload.aliases
    with pytest.raises(ValueError, match="bucket_bytes must be >= 1"):
        next(iter_buckets(payload, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_payload_from_buckets_reproduces_the_sender(dtype):
    sender = perturbed(tied_student(), seed=5).to(dtype)
    receiver = tied_student().to(dtype)
    payload = state_dict_payload(sender)
    checksum = payload_checksum(payload)
    assert payload_checksum(receiver) != checksum
    assert load_payload(receiver, list(iter_buckets(payload, 1024)), checksum) == checksum
    for (name, sent), received in zip(sender.state_dict().items(), receiver.state_dict().values()):
        assert torch.equal(sent, received), name
    # The tie survives: the LM head is still the embedding's memory.
    assert receiver.lm_head.weight.data_ptr() == receiver.model.embed_tokens.weight.data_ptr()


def _refused(receiver, payload, checksum, match):
    before = {name: t.clone() for name, t in receiver.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_payload(receiver, payload, checksum)
    for name, tensor in receiver.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed by a refused payload"


def test_bad_payloads_are_refused_and_weights_kept():
    receiver = tied_student()
    payload = state_dict_payload(perturbed(tied_student(), seed=5))
    checksum = payload_checksum(payload)
    _refused(receiver, payload, "0" * 64, "checksum .* does not match the expected 0000000000000000")

    def edited(**tensors):
        return WeightPayload({**payload.tensors, **tensors}, payload.aliases)

    wide = edited(**{"model.norm.weight": torch.ones(17)})
    _refused(receiver, wide, payload_checksum(wide),
             r"'model.norm.weight' is \(17,\) float32, the model expects \(16,\)")
    half = edited(**{"model.norm.weight": torch.ones(16, dtype=torch.float16)})
    _refused(receiver, half, payload_checksum(half), "is \\(16,\\) float16")
    extra = edited(**{"lm_head.weight": payload.tensors["model.embed_tokens.weight"].clone()})
    _refused(receiver, extra, checksum, "unexpected tensor 'lm_head.weight' \\(the model ties it to")
    missing = WeightPayload({k: v for k, v in payload.tensors.items() if k != "model.norm.weight"}, payload.aliases)
    _refused(receiver, missing, checksum, "missing 1 tensor\\(s\\).*model.norm.weight")
    twice = [WeightPayload(dict(payload.tensors), payload.aliases), WeightPayload(dict(payload.tensors))]
    _refused(receiver, twice, checksum, "sent twice")


def test_plain_worker_from_builders_without_tokenizer():
    threads = torch.get_num_threads()
    try:
        local = RolloutWorker(lambda: make_tiny_lm("llama", VOCAB, seed=1, init_std=0.5), tied_student, threads=2)
    finally:
        torch.set_num_threads(threads)
    assert (local.eos_token_id, local.pad_token_id) == (EOS, PAD)  # from the student's config
    assert local.policy_version() == UNSYNCED_VERSION
    rollout = local.generate(PROMPTS, SamplingConfig(max_new_tokens=3), seed=0, policy_version_expected=-1)
    assert rollout.response_ids.shape[0] == len(PROMPTS) and rollout.policy_version == UNSYNCED_VERSION
    with pytest.raises(ValueError, match="generate_for_eval needs a tokenizer"):
        local.generate_for_eval(PROMPTS, EvalConfig.validation(), seed=0)
    with pytest.raises(ValueError, match="load_student_weights version must be an int >= 0"):
        local.load_student_weights(state_dict_payload(local.student), -1, "")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        RolloutWorker(tied_student, tied_student, threads=0)


# ---------------------------------------------------------------- the Ray actor

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """``(teacher_dir, student_dir)``: HF directories with the shared tokenizer, read by the actor."""
    root = tmp_path_factory.mktemp("worker_models")
    tokenizer = make_tokenizer()
    dirs = []
    for name, model in (("teacher", make_tiny_lm("llama", VOCAB, num_layers=2, seed=1, init_std=0.5)),
                        ("student", tied_student())):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs.append(str(root / name))
    return tuple(dirs)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray started with launcher variables in its environment, as under ``deepspeed``."""
    started = not ray.is_initialized()
    if started:
        saved = {key: os.environ.get(key) for key in LAUNCHER_ENV_VARS}
        os.environ.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def worker(local_ray, model_dirs):
    teacher_dir, student_dir = model_dirs
    handle = make_rollout_worker(teacher_dir, student_dir, student_dir, threads=1, seed=0, name="rollout-worker-0")
    yield handle
    local_ray.kill(handle, no_restart=True)


@pytest.fixture(scope="module")
def local_models(model_dirs):
    """The learner's side: the same teacher, and a student one update away from the saved one."""
    teacher_dir, student_dir = model_dirs
    return load_causal_lm(teacher_dir), perturbed(load_causal_lm(student_dir), seed=7)


def get(ref, what="rollout-worker-0"):
    return call_with_timeout(ref, TIMEOUT_S, what)


def sync(worker, student, version, bucket_bytes: int | None = 4096) -> str:
    return broadcast_student_weights([worker], student, version, timeout_s=TIMEOUT_S, bucket_bytes=bucket_bytes)


def test_actor_threads_env_and_initial_version(worker):
    info = get(worker.process_info.remote())
    assert info["pid"] != os.getpid()
    # Ray's default for worker processes is nice 15: a rollout worker there loses its cores to any
    # other process (measured: 5-7x slower rounds beside another job).
    assert info["niceness"] == os.nice(0)
    assert info["torch_threads"] == 1
    assert info["launcher_env"] == {}  # Ray handed it RANK etc.; the actor dropped them
    assert info["policy_version"] == UNSYNCED_VERSION == get(worker.policy_version.remote())


def test_weight_sync_matches_learner_and_bad_payloads_keep_old_weights(worker, local_models):
    _, student = local_models
    checksum = sync(worker, student, version=3)
    assert checksum == payload_checksum(student) == get(worker.student_checksum.remote())
    assert get(worker.policy_version.remote()) == 3

    payload = state_dict_payload(perturbed(tied_student(), seed=9))
    with pytest.raises(ValueError, match="rollout-worker-0: weight payload: checksum .* does not match"):
        get(worker.load_student_weights.remote(payload, 4, "f" * 64))
    wrong_shape = WeightPayload({**payload.tensors, "model.norm.weight": torch.ones(8)}, payload.aliases)
    with pytest.raises(ValueError, match="'model.norm.weight' is \\(8,\\) float32, the model expects \\(16,\\)"):
        get(worker.load_student_weights.remote(wrong_shape, 4, payload_checksum(wrong_shape)))
    assert get(worker.student_checksum.remote()) == checksum
    assert get(worker.policy_version.remote()) == 3


@pytest.mark.parametrize("cfg", [
    SamplingConfig(alpha=0.2, max_new_tokens=12, teacher_dist="exact"),
    SamplingConfig(alpha=0.0, temperature=0.8, top_k=10, max_new_tokens=12, teacher_dist="topk", teacher_topk=5),
], ids=["mixed-exact", "student-only-topk"])
def test_rollout_equals_local_sampler(worker, local_models, cfg):
    teacher, student = local_models
    sync(worker, student, version=5)
    remote = get(worker.generate.remote(PROMPTS, cfg, 123, 5))
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actor's thread count: same reduction order
    try:
        local = sample_rollouts(student, teacher, prompt_ids, prompt_mask, cfg, EOS, PAD,
                                generator=torch.Generator().manual_seed(123), policy_version=5)
    finally:
        torch.set_num_threads(threads)
    assert remote.policy_version == 5 and remote.alpha == cfg.alpha
    assert remote.response_mask.sum() > len(PROMPTS)  # something was generated
    for field in dataclasses.fields(local):
        mine, theirs = getattr(local, field.name), getattr(remote, field.name)
        if isinstance(mine, torch.Tensor):
            assert theirs.dtype == mine.dtype and theirs.shape == mine.shape, field.name
            torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-6, msg=field.name)
        else:
            assert theirs == mine, field.name


def test_generate_refuses_another_policy_version(worker, local_models):
    sync(worker, local_models[1], version=6)
    cfg = SamplingConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="generate asked for policy version 7, but the student is at version 6; "
                                         "sync weights first"):
        get(worker.generate.remote(PROMPTS, cfg, 0, 7))
    store = make_replay_store_actor(max_samples=8, max_bytes=10**8)
    report = get(worker.generate_into.remote(store, PROMPTS, cfg, 0, 6))
    assert report.num_samples == len(PROMPTS)
    assert set(report.seconds) == {"decode", "teacher", "generate_other", "put", "weight_load"}
    assert min(report.seconds.values()) >= 0 and report.seconds["decode"] > 0 and report.seconds["teacher"] > 0
    (item,) = take_blocking(store, len(PROMPTS), min_policy_version=6, timeout_s=TIMEOUT_S)
    assert item.policy_version == item.payload.policy_version == 6
    # Lazy mixing: one model per position, plus the other's catch-up forward after the last.
    assert sum(report.forward_calls.values()) == item.payload.response_ids.shape[1] + 1
    ray.kill(store)


def test_eval_generation_and_teacher_scores_match_local(worker, local_models, model_dirs):
    teacher, student = local_models
    sync(worker, student, version=8)
    cfg = EvalConfig.validation(max_new_tokens=6, batch_size=3, seed=4)
    texts = get(worker.generate_for_eval.remote(PROMPTS, cfg, 4))
    assert all(isinstance(text, str) for text in texts) and len(texts) == len(PROMPTS)
    assert texts == generate_responses(student, load_tokenizer(model_dirs[1]), PROMPTS, cfg, seed=4)

    # Right-padded plain text, as a PT batch comes.
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, PAD, PAD]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    full = get(worker.score_teacher.remote(input_ids, attention_mask))
    with torch.no_grad():
        expected = torch.log_softmax(teacher(input_ids=input_ids, attention_mask=attention_mask).logits, dim=-1)
    torch.testing.assert_close(full.logprobs[attention_mask == 1], expected[attention_mask == 1], rtol=0, atol=1e-5)
    assert torch.all(full.logprobs[attention_mask == 0] == 0)
    tail = get(worker.score_teacher.remote(input_ids, attention_mask, 0, 3))  # only the last 3 positions
    assert tail.logprobs.shape == (2, 3, full.logprobs.shape[-1])
    torch.testing.assert_close(tail.logprobs, full.logprobs[:, -3:], rtol=0, atol=1e-5)
    assert torch.all(tail.logprobs[attention_mask[:, -3:] == 0] == 0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        get(worker.score_teacher.remote(input_ids, attention_mask, 0, 6))
    top = get(worker.score_teacher.remote(input_ids, attention_mask, 4))
    assert top.logprobs is None and top.topk_logprobs.shape == (2, 5, 4)
    torch.testing.assert_close(top.topk_logprobs, full.logprobs.topk(4, dim=-1).values, rtol=0, atol=0)
    assert torch.equal(full.logprobs.gather(-1, top.topk_ids), top.topk_logprobs)


def test_validation_on_workers_equals_local_generation_also_after_a_restart(worker, local_models, model_dirs):
    """The coordinator's validation path: weights pushed, shards generated with their seeds; a
    worker killed before the call comes back with the saved weights and is re-synced first."""
    _, student = local_models
    cfg = EvalConfig.validation(max_new_tokens=6, batch_size=3, seed=4)
    tokenizer = load_tokenizer(model_dirs[1])
    shards, seeds = [PROMPTS[:2], PROMPTS[2:]], [4, 5]
    expected = [generate_responses(student, tokenizer, shard, cfg, seed) for shard, seed in zip(shards, seeds)]
    assert generate_texts_on_workers([worker], shards, seeds, cfg, student, 12, TIMEOUT_S, TIMEOUT_S) == expected
    assert get(worker.policy_version.remote()) == 12
    os.kill(get(worker.process_info.remote())["pid"], signal.SIGKILL)
    assert generate_texts_on_workers([worker], shards, seeds, cfg, student, 12, TIMEOUT_S, TIMEOUT_S) == expected
    assert get(worker.policy_version.remote()) == 12
    with pytest.raises(StaleWeights, match="generate_for_eval asked for policy version 13"):
        get(worker.generate_for_eval.remote(PROMPTS, cfg, 4, 13))


def test_killed_worker_restarts_unsynced_and_works_after_resync(worker, local_models):
    _, student = local_models
    cfg = SamplingConfig(alpha=0.2, max_new_tokens=8)
    sync(worker, student, version=10)
    before = get(worker.generate.remote(PROMPTS, cfg, 11, 10))
    old_pid = get(worker.process_info.remote())["pid"]

    os.kill(old_pid, signal.SIGKILL)
    info = get(worker.process_info.remote())  # retried by Ray until the restarted actor answers
    assert info["pid"] != old_pid
    assert info["policy_version"] == UNSYNCED_VERSION
    assert info["launcher_env"] == {} and info["torch_threads"] == 1
    with pytest.raises(ValueError, match="but the student is at version -1"):
        get(worker.generate.remote(PROMPTS, cfg, 11, 10))

    sync(worker, student, version=10, bucket_bytes=None)  # one object, resolved by Ray
    after = get(worker.generate.remote(PROMPTS, cfg, 11, 10))
    assert torch.equal(after.response_ids, before.response_ids)
    assert torch.equal(after.student_logprobs, before.student_logprobs)


def test_slow_call_times_out_with_a_clear_error_and_the_worker_is_shut_down(worker, local_models):
    sync(worker, local_models[1], version=12)
    info = get(worker.process_info.remote())
    # Thousands of prompts take seconds; 50 ms cannot suffice, so this is what a stuck worker looks like.
    many_prompts = PROMPTS * 1024
    cfg = SamplingConfig(max_new_tokens=64, teacher_dist="none")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^rollout-worker-0\.generate did not finish within 0\.05 s$"):
        call_with_timeout(worker.generate.remote(many_prompts, cfg, 0, 12), 0.05, "rollout-worker-0.generate")
    assert time.monotonic() - started < 5.0

    ray.kill(worker, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the killed worker's process {info['pid']} is still alive")
    with pytest.raises(RuntimeError, match="rollout-worker-0.policy_version: the actor died"):
        call_with_timeout(worker.policy_version.remote(), TIMEOUT_S, "rollout-worker-0.policy_version")
