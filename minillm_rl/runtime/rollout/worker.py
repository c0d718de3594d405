"""The rollout worker: a frozen teacher and a versioned student copy that generate rollouts.

About 400 lines: the worker class, its Ray actor factory and the caller-side helpers that talk to
it (timeouts, weight publishing) share its version contract, described here once.

:class:`RolloutWorker` is a plain class (tested without Ray); :func:`make_rollout_worker` starts
it as a restartable Ray actor. The client helpers :func:`call_with_timeout` and
:func:`broadcast_student_weights` are what the coordinator uses to talk to the actors.

Versions: a worker starts at :data:`UNSYNCED_VERSION` (-1) with the student its spec describes,
and only ``load_student_weights`` sets a real version. Ray restarts a killed actor by running the
constructor again, so a restarted worker reports -1 from :meth:`RolloutWorker.policy_version`;
the coordinator re-sends the current weights. A call retried by Ray on the restarted actor then
fails the version check instead of generating with the wrong weights; that is why
:class:`~minillm_rl.runtime.rollout.client.RolloutClient` launches ``generate_into`` with
``max_task_retries=0`` and re-launches it itself after the re-sync. Read-only calls and
``load_student_weights`` (idempotent) keep Ray's retries.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from minillm_rl.algorithm.batching import left_pad
from minillm_rl.errors import RunFailed
from minillm_rl.evaluation.protocol import EvalConfig, generate_responses
from minillm_rl.algorithm.forward import position_ids_from_mask
from minillm_rl.models import load_causal_lm, load_tokenizer
from minillm_rl.runtime.replay import FOREGROUND_ACTOR, put_blocking
from minillm_rl.algorithm.sampler import Rollout, SamplingConfig, sample_rollouts
from minillm_rl.algorithm.teacher_head import HeadRecorder
from minillm_rl.runtime.weights import WeightPayload, iter_buckets, load_payload, payload_checksum, state_dict_payload

UNSYNCED_VERSION = -1

# Set by the deepspeed/torchrun launchers in the learner's environment, which Ray worker
# processes inherit; an actor that saw them could join (or hang on) the learners' process group.
LAUNCHER_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# A model or tokenizer: a local HF directory / hub name, or a picklable zero-argument builder.
Spec = str | os.PathLike | Callable[[], Any]


class ActorDied(RunFailed):
    """An actor call failed because the actor's process died (Ray may be restarting it)."""


class StaleWeights(ValueError):
    """A call asked for a weight version the worker does not hold (e.g. it was restarted)."""


@dataclass
class TeacherScores:
    """Teacher log-probs (temperature 1, full vocabulary) for a plain-text batch.

    Full mode: ``logprobs [B, L, V]`` float32. Top-K mode: ``topk_logprobs [B, L, K]`` float32
    and ``topk_ids [B, L, K]`` long. Hidden mode: ``hidden [B, L, d]``, the teacher's final hidden
    states (its LM head's input; the learner applies the head). Position ``i`` predicts token
    ``i + 1``; padded positions hold 0. With ``logits_to_keep = N`` only the last ``N`` positions
    are there (``L = N``).
    """

    logprobs: torch.Tensor | None
    topk_logprobs: torch.Tensor | None
    topk_ids: torch.Tensor | None
    hidden: torch.Tensor | None = None


@dataclass
class ShardReport:
    """What one :meth:`RolloutWorker.generate_into` call did: ``num_samples`` stored, and the
    worker's seconds per stage: ``decode`` (the student's forwards and sampling), ``teacher`` (the
    teacher's forwards and records), ``generate_other`` (padding, copies), ``put`` (serialising
    the rollout into the object store and the replay store accepting it) and ``weight_load``
    (weight syncs this worker ran since its previous report, i.e. between generations); and the
    ``forward_calls`` of each model (``student``, ``teacher``) that generated the rollout."""

    num_samples: int
    seconds: dict[str, float]
    forward_calls: dict[str, int] = field(default_factory=dict)

    @property
    def busy_seconds(self) -> float:
        return sum(self.seconds.values())


def _build(spec: Spec, what: str, loader: Callable[[str], Any]) -> Any:
    if callable(spec):
        return spec()
    if isinstance(spec, (str, os.PathLike)):
        return loader(spec)
    raise ValueError(f"RolloutWorker: {what} spec must be a path or a callable, got {type(spec).__name__}")


def _special_ids(tokenizer, student) -> tuple[int | list[int] | None, int]:
    """``(eos_token_id, pad_token_id)`` from the tokenizer, else from the student's config."""
    if tokenizer is not None:
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
    else:
        eos = student.generation_config.eos_token_id
        if eos is None:
            eos = student.config.eos_token_id
        pad = student.config.pad_token_id
    if pad is None:
        first_eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        pad = 0 if first_eos is None else first_eos
    return eos, pad


class RolloutWorker:
    """A frozen teacher and a student copy at a known policy version, on one device.

    Args:
        teacher_spec, student_spec: HF directory (or hub name) or a picklable builder callable.
        tokenizer_spec: path or builder of the shared tokenizer; needed for
            :meth:`generate_for_eval`; without it EOS/pad come from the student's config.
        threads: ``torch.set_num_threads`` for this process (Ray actors default to 1).
        seed: global torch seed set before the models are built (builders that initialise
            randomly then give the same weights after a restart).
        dtype: dtype for models loaded from a path.
        device: where the models live (``"cuda"`` in a GPU actor: Ray narrows the visible GPUs).
        name: used in error messages.
    """

    def __init__(self, teacher_spec: Spec, student_spec: Spec, tokenizer_spec: Spec | None = None,
                 threads: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 name: str = "rollout-worker"):
        if threads < 1:
            raise ValueError(f"RolloutWorker: threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.name = name
        self.device = torch.device(device)

        def load_model(path):
            return load_causal_lm(path, dtype=dtype)

        self.teacher = _build(teacher_spec, "teacher", load_model).to(self.device).eval().requires_grad_(False)
        self.student = _build(student_spec, "student", load_model).to(self.device).eval().requires_grad_(False)
        self.tokenizer = None if tokenizer_spec is None else _build(tokenizer_spec, "tokenizer", load_tokenizer)
        self.eos_token_id, self.pad_token_id = _special_ids(self.tokenizer, self.student)
        self._policy_version = UNSYNCED_VERSION
        self._checksum: str | None = None  # of the weights loaded as _policy_version
        self._load_seconds = 0.0  # spent in load_student_weights since the last ShardReport

    def policy_version(self) -> int:
        """The student's weight version; :data:`UNSYNCED_VERSION` until the first sync."""
        return self._policy_version

    def process_info(self) -> dict[str, Any]:
        """Pid, scheduling niceness, torch threads, version and any launcher variables visible (for
        health checks)."""
        return {"pid": os.getpid(), "niceness": os.nice(0), "torch_threads": torch.get_num_threads(),
                "policy_version": self._policy_version,
                "launcher_env": {key: os.environ[key] for key in LAUNCHER_ENV_VARS if key in os.environ}}

    def student_checksum(self) -> str:
        """Checksum of the student's current weights (see :mod:`minillm_rl.runtime.weights`)."""
        return payload_checksum(self.student)

    def load_student_weights(self, payload: WeightPayload | Sequence[Any], version: int, checksum: str,
                             fetch_timeout_s: float = 600.0) -> str:
        """Load a payload, or a list of buckets (payloads or Ray object references), as ``version``.

        Returns the checksum recomputed from the loaded student, for the learner to compare.
        A payload that does not fit the student or fails ``checksum`` raises ``ValueError`` and
        leaves both weights and version unchanged.
        """
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"{self.name}: load_student_weights version must be an int >= 0, got {version!r}")
        started = time.perf_counter()
        try:
            return self._load_student_weights(payload, version, checksum, fetch_timeout_s)
        finally:
            self._load_seconds += time.perf_counter() - started

    def _load_student_weights(self, payload: WeightPayload | Sequence[Any], version: int, checksum: str,
                              fetch_timeout_s: float) -> str:
        if version == self._policy_version and checksum == self._checksum:
            return checksum  # held already (e.g. sent again for validation): nothing to fetch

        def fetch(bucket):
            if isinstance(bucket, WeightPayload):
                return bucket
            import ray

            return ray.get(bucket, timeout=fetch_timeout_s)

        try:
            loaded = load_payload(self.student, payload, checksum, fetch)
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from None
        if loaded != checksum:
            # Weights were written but do not read back as sent: this copy is of no known version.
            self._policy_version, self._checksum = UNSYNCED_VERSION, None
            raise ValueError(f"{self.name}: student checksum after loading is {loaded[:16]}..., expected "
                             f"{checksum[:16]}...; the worker is now unsynced")
        self._policy_version, self._checksum = version, loaded
        return loaded

    def _check_version(self, expected: int, call: str) -> None:
        if self._policy_version != expected:
            raise StaleWeights(f"{self.name}: {call} asked for policy version {expected}, but the student is at "
                             f"version {self._policy_version}; sync weights first")

    def generate(self, prompt_id_lists: Sequence[Sequence[int]], sampling_cfg: SamplingConfig, seed: int,
                 policy_version_expected: int, timings: dict[str, float] | None = None,
                 forward_calls: dict[str, int] | None = None) -> Rollout:
        """One teacher-mixed rollout per prompt (``sample_rollouts`` on left-padded prompts with a
        ``torch.Generator`` seeded by ``seed``), tagged with the worker's policy version, which
        is also read at every decode step (``Rollout.token_policy_versions``). ``timings``: gets
        the sampler's ``decode`` and ``teacher`` seconds; ``forward_calls``: each model's forwards.

        Raises:
            ValueError: the worker's version is not ``policy_version_expected``, or a prompt is empty.
        """
        self._check_version(policy_version_expected, "generate")
        if not prompt_id_lists or any(len(ids) == 0 for ids in prompt_id_lists):
            raise ValueError(f"{self.name}: generate needs a non-empty list of non-empty prompts")
        prompt_ids, prompt_mask = left_pad(prompt_id_lists, self.pad_token_id)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return sample_rollouts(
            self.student, self.teacher, prompt_ids.to(self.device), prompt_mask.to(self.device), sampling_cfg,
            self.eos_token_id, self.pad_token_id, generator=generator, policy_version=self.policy_version,
            timings=timings, forward_calls=forward_calls,
        ).to("cpu")

    def generate_from_teacher(self, prompt_id_lists: Sequence[Sequence[int]], sampling_cfg: SamplingConfig,
                              seed: int) -> Rollout:
        """Teacher samples (``alpha = 1``, e.g. SeqKD targets): :meth:`generate` without the
        student's version check, since no student weight is involved."""
        if sampling_cfg.alpha != 1.0:
            raise ValueError(f"{self.name}: generate_from_teacher needs sampling alpha = 1, got {sampling_cfg.alpha}")
        return self.generate(prompt_id_lists, sampling_cfg, seed, self._policy_version)

    def generate_into(self, replay_store: Any, prompt_id_lists: Sequence[Sequence[int]],
                      sampling_cfg: SamplingConfig, seed: int, policy_version_expected: int,
                      put_timeout_s: float = 600.0, key: Any = None) -> ShardReport:
        """:meth:`generate`, then put the rollout into ``replay_store`` (a ReplayStore actor handle
        or buffer) tagged with its policy version and ``key`` (a store ignores a key it already
        accepted); returns how many samples it generated and where its time went."""
        started = time.perf_counter()
        stages, calls = {"decode": 0.0, "teacher": 0.0}, {}
        rollout = self.generate(prompt_id_lists, sampling_cfg, seed, policy_version_expected, timings=stages,
                                forward_calls=calls)
        generated = time.perf_counter()
        put_blocking(replay_store, rollout, rollout.policy_version, timeout_s=put_timeout_s,
                     rpc_timeout_s=put_timeout_s, key=key)
        seconds = {**stages, "generate_other": max(generated - started - sum(stages.values()), 0.0),
                   "put": time.perf_counter() - generated, "weight_load": self._load_seconds}
        self._load_seconds = 0.0
        return ShardReport(rollout.response_ids.shape[0], seconds, calls)

    @torch.no_grad()
    def score_teacher(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, top_k: int = 0,
                      logits_to_keep: int = 0, hidden_dtype: torch.dtype | None = None) -> TeacherScores:
        """Teacher next-token log-probs for a batch: PT blocks (algorithm.md §4.4) or word-level
        KD's prompt + response rows (§5).

        Args:
            input_ids, attention_mask: ``[B, L]``, left or right padded (positions come from the mask).
            top_k: 0 ships the full ``[B, L, V]`` distribution; ``K > 0`` ships its top ``K``.
            logits_to_keep: 0 scores every position; ``N > 0`` only the last ``N`` (KD needs the
                response positions alone: the LM head, softmax and payload shrink with them).
            hidden_dtype: ship the teacher's final hidden states in this dtype instead of
                log-probs (``teacher_dist='hidden'``; refused for a teacher whose logits are not
                its linear head's output).
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"{self.name}: score_teacher needs input_ids and attention_mask of one shape "
                             f"[batch, length]; got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        if top_k < 0:
            raise ValueError(f"{self.name}: score_teacher top_k must be >= 0 (0 = full), got {top_k}")
        if not 0 <= logits_to_keep <= input_ids.shape[1]:
            raise ValueError(f"{self.name}: score_teacher logits_to_keep must be in [0, {input_ids.shape[1]}] "
                             f"(0 = every position), got {logits_to_keep}")
        attention_mask = attention_mask.long().to(self.device)
        recorder = HeadRecorder(self.teacher) if hidden_dtype is not None else None
        with recorder or contextlib.nullcontext():
            logits = self.teacher(input_ids=input_ids.to(self.device), attention_mask=attention_mask,
                                  position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                                  logits_to_keep=logits_to_keep).logits
        padding = (attention_mask == 0)[:, -logits.shape[1]:]
        if recorder is not None:
            hidden = recorder.hidden_for(logits).to(hidden_dtype)
            return TeacherScores(None, None, None, hidden.masked_fill_(padding[..., None], 0).cpu())
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if top_k == 0:
            return TeacherScores(logprobs.masked_fill_(padding[..., None], 0).cpu(), None, None)
        values, ids = torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1)
        return TeacherScores(None, values.masked_fill_(padding[..., None], 0).cpu(),
                             ids.masked_fill_(padding[..., None], 0).cpu())

    def generate_for_eval(self, prompt_id_lists: Sequence[Sequence[int]], eval_cfg: EvalConfig,
                          seed: int, policy_version_expected: int | None = None) -> list[str]:
        """Sampled student responses as strings (``evaluation.generate_responses``), from the
        weights of version ``policy_version_expected`` when given (else whatever it holds)."""
        if policy_version_expected is not None:
            self._check_version(policy_version_expected, "generate_for_eval")
        if self.tokenizer is None:
            raise ValueError(f"{self.name}: generate_for_eval needs a tokenizer; create the worker with tokenizer_spec")
        return generate_responses(self.student, self.tokenizer, prompt_id_lists, eval_cfg, seed)


class _RolloutWorkerActor(RolloutWorker):
    """The actor flavour: drops the launcher variables first. Done here rather than through
    ``runtime_env["env_vars"]``, which can set variables but not unset them (an empty ``RANK``
    breaks ``int()`` parsing downstream); a plain worker in the learner's own process must not
    touch its environment, hence the subclass."""

    def __init__(self, *args, **kwargs):
        for key in LAUNCHER_ENV_VARS:
            os.environ.pop(key, None)
        super().__init__(*args, **kwargs)


def make_rollout_worker(teacher_spec: Spec, student_spec: Spec, tokenizer_spec: Spec | None = None, *,
                        threads: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        name: str = "rollout-worker", num_cpus: float | None = None, num_gpus: float = 0,
                        max_restarts: int = -1, max_task_retries: int = 3):
    """Start a :class:`RolloutWorker` Ray actor (needs ``ray.init`` first).

    ``num_cpus`` defaults to ``threads``; the process runs at the normal priority
    (:data:`~minillm_rl.runtime.replay.FOREGROUND_ACTOR`). Ray restarts the actor up to ``max_restarts`` times
    (-1 = always) by running the constructor again, and retries a call interrupted by a restart
    up to ``max_task_retries`` times.
    """
    import ray

    options = {"num_cpus": threads if num_cpus is None else num_cpus, "num_gpus": num_gpus,
               "max_restarts": max_restarts, "max_task_retries": max_task_retries, **FOREGROUND_ACTOR}
    return ray.remote(_RolloutWorkerActor).options(**options).remote(
        teacher_spec, student_spec, tokenizer_spec, threads=threads, seed=seed, dtype=dtype, device=device, name=name)


def call_with_timeout(ref: Any, timeout_s: float, what: str) -> Any:
    """``ray.get(ref)`` (one reference or a list) within ``timeout_s``, with one-line errors.

    An exception raised inside the actor is re-raised as itself (not Ray's wrapper with the remote
    traceback), so a worker's ``ValueError`` reaches the coordinator as that one line.

    Raises:
        TimeoutError: naming ``what`` (e.g. ``"rollout-worker-1.generate"``). The call is not
            cancelled: the caller decides whether to kill the stuck worker.
        ActorDied: the actor died (a :class:`~minillm_rl.errors.RunFailed`, printed as one line).
    """
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what} did not finish within {timeout_s:g} s") from None
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, Exception):
            raise err.cause from None
        raise
    except ray.exceptions.RayActorError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ActorDied(f"{what}: the actor died ({first_line})") from None


def publish_student_weights(workers: Sequence[Any], model_or_payload: Any, version: int,
                            bucket_bytes: int | None = None) -> tuple[str, list[Any]]:
    """Put the student into the object store once and queue ``load_student_weights`` on every
    worker actor, without waiting.

    A worker actor runs one call at a time, in the order its caller submitted them, so a load
    queued behind a generation runs after it and before the next call from this process: a
    sync never interrupts a generation, and the caller does not wait for one.

    ``model_or_payload``: a model, a state dict or a :class:`WeightPayload` (serialised now, so
    later updates of the model do not reach the workers). With ``bucket_bytes`` each bucket is
    put separately (bounded object sizes); workers fetch them one at a time.

    Returns:
        The payload checksum and, per worker, the reference to its load's answer (the checksum
        it read back; see :func:`await_weight_loads`).
    """
    import ray

    payload = model_or_payload if isinstance(model_or_payload, WeightPayload) else state_dict_payload(model_or_payload)
    checksum = payload_checksum(payload)
    if bucket_bytes is None:
        # A top-level reference: Ray resolves it in the actor, from the one stored copy.
        shipped: Any = ray.put(payload)
    else:
        shipped = [ray.put(bucket) for bucket in iter_buckets(payload, bucket_bytes)]
    return checksum, [worker.load_student_weights.remote(shipped, version, checksum) for worker in workers]


def await_weight_loads(refs: Sequence[Any], checksum: str, version: int, timeout_s: float,
                       names: Sequence[str]) -> None:
    """Wait (``timeout_s`` in total) for the loads :func:`publish_student_weights` queued.

    Raises:
        TimeoutError: the workers did not all finish loading within ``timeout_s``.
        ValueError: a worker refused the payload or reported another checksum.
    """
    deadline = time.monotonic() + timeout_s
    for name, ref in zip(names, refs):
        remaining = max(deadline - time.monotonic(), 0.0)
        loaded = call_with_timeout(ref, remaining, f"{name}.load_student_weights(version={version})")
        if loaded != checksum:
            raise ValueError(f"{name}: loaded weights have checksum {loaded[:16]}..., "
                             f"the learner's is {checksum[:16]}...")


def broadcast_student_weights(workers: Sequence[Any], model_or_payload: Any, version: int, timeout_s: float,
                              bucket_bytes: int | None = None, names: Sequence[str] | None = None) -> str:
    """:func:`publish_student_weights`, then wait until every worker has loaded the weights.

    Returns:
        The payload checksum, which every worker confirmed.

    Raises:
        TimeoutError: the workers did not all finish loading within ``timeout_s`` (in total).
        ValueError: a worker refused the payload or reported another checksum.
    """
    checksum, refs = publish_student_weights(workers, model_or_payload, version, bucket_bytes)
    names = list(names) if names is not None else [f"rollout-worker-{i}" for i in range(len(workers))]
    await_weight_loads(refs, checksum, version, timeout_s, names)
    return checksum
