"""Student weight payloads for learner -> rollout-worker sync: export, checksum, buckets, load.

Pure torch, no Ray. A :class:`WeightPayload` holds every distinct tensor of a state dict once:
tensors that share storage (a tied LM head and input embedding) are sent under one name and the
others are listed in ``aliases``, so the receiver, whose model is tied the same way, gets them
by loading the canonical tensor.

The checksum is built from one SHA-256 digest per tensor (over name, dtype, shape and the SHA-256
digests of its raw bytes in 16 MiB chunks), combined in sorted-name order. It therefore does not
depend on the order tensors arrive in or on how they were split into buckets, and a receiver can
verify a bucketed transfer while holding only one bucket at a time. The chunks are hashed on
``torch.get_num_threads()`` threads (hashlib releases the GIL): a sync hashes the weights three
times (the learner once; the worker the payload, then its model read back), on the critical path
of an on-policy round, and one SHA-256 pass over a 200 MB fp32 student measured 0.18 s on one core
here (a 1.3B-parameter bf16 student: ~1.4 s per pass); the chunks let every core the role owns
share it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from minillm_rl.tensor_pickle import TensorsAsArrays


@dataclass
class WeightPayload(TensorsAsArrays):
    """Distinct tensors by name; ``aliases`` maps a tied name to the canonical name it shares.
    Pickled as raw bytes (:mod:`minillm_rl.tensor_pickle`): what a sync ships through Ray."""

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.tensors.values())


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Identity of the memory a tensor views: equal keys mean the two names are tied."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def state_dict_payload(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> WeightPayload:
    """The model's (or state dict's) tensors, detached, in their own dtype, each storage once.

    The first name (in state-dict order) of a group of tied tensors is the canonical one. Tensors
    are not copied: the payload views the model's memory until it is serialised.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    canonical_by_storage: dict[tuple, str] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state_dict_payload: entry {name!r} is a {type(tensor).__name__}, expected a tensor")
        # Empty tensors may all report data_ptr 0; they are never tied.
        key = _storage_key(tensor) if tensor.numel() else ("empty", name)
        if key in canonical_by_storage:
            aliases[name] = canonical_by_storage[key]
        else:
            canonical_by_storage[key] = name
            tensors[name] = tensor.detach()
    return WeightPayload(tensors, aliases)


def _as_payload(payload: WeightPayload | Mapping[str, torch.Tensor]) -> WeightPayload:
    return payload if isinstance(payload, WeightPayload) else state_dict_payload(payload)


DIGEST_CHUNK_BYTES = 16 << 20


def tensor_digests(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """``{name: SHA-256 hex digest}`` of each tensor's name, dtype, shape and bytes (any dtype, bf16
    included): the digest of the header and the digests of its :data:`DIGEST_CHUNK_BYTES` chunks,
    which are hashed on ``torch.get_num_threads()`` threads. The result does not depend on the
    thread count."""
    tensors = []  # (name, header, chunks)
    for name, tensor in named_tensors:
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        chunks = [raw[start:start + DIGEST_CHUNK_BYTES] for start in range(0, len(raw), DIGEST_CHUNK_BYTES)]
        tensors.append((name, f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode(), chunks))
    jobs = [chunk for _, _, chunks in tensors for chunk in chunks]
    with ThreadPoolExecutor(max_workers=max(1, min(torch.get_num_threads(), len(jobs)))) as pool:
        leaves = iter(list(pool.map(lambda chunk: hashlib.sha256(chunk).digest(), jobs)))
    digests = {}
    for name, header, chunks in tensors:
        digest = hashlib.sha256(header)
        for _ in chunks:
            digest.update(next(leaves))
        digests[name] = digest.hexdigest()
    return digests


def combine_digests(digests: Mapping[str, str], aliases: Mapping[str, str]) -> str:
    """The payload checksum from per-tensor digests and the alias table (order-independent)."""
    combined = hashlib.sha256()
    for name in sorted(digests):
        combined.update(f"T\0{name}\0{digests[name]}\n".encode())
    for alias in sorted(aliases):
        combined.update(f"A\0{alias}\0{aliases[alias]}\n".encode())
    return combined.hexdigest()


def payload_checksum(payload: WeightPayload | Mapping[str, torch.Tensor]) -> str:
    """Deterministic SHA-256 hex checksum of a payload (or of a state dict, deduplicated first)."""
    payload = _as_payload(payload)
    return combine_digests(tensor_digests(payload.tensors.items()), payload.aliases)


def iter_buckets(payload: WeightPayload | Mapping[str, torch.Tensor], bucket_bytes: int) -> Iterator[WeightPayload]:
    """Split a payload into buckets of at most ``bucket_bytes`` each (a larger tensor travels
    alone), in sorted-name order. An alias travels with its canonical tensor, so the buckets'
    union is the payload and their checksum is the payload's."""
    if bucket_bytes < 1:
        raise ValueError(f"iter_buckets: bucket_bytes must be >= 1, got {bucket_bytes}")
    payload = _as_payload(payload)
    aliases_of: dict[str, dict[str, str]] = {}
    for alias, canonical in payload.aliases.items():
        aliases_of.setdefault(canonical, {})[alias] = canonical
    bucket = WeightPayload({})
    for name in sorted(payload.tensors):
        tensor = payload.tensors[name]
        size = tensor.numel() * tensor.element_size()
        if bucket.tensors and bucket.num_bytes + size > bucket_bytes:
            yield bucket
            bucket = WeightPayload({})
        bucket.tensors[name] = tensor
        bucket.aliases.update(aliases_of.get(name, {}))
    if bucket.tensors:
        yield bucket


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def _check_bucket(bucket: Any, index: int, expected: WeightPayload, seen: set[str]) -> WeightPayload:
    """Names, shapes and dtypes of one received bucket against the model's own payload."""
    if not isinstance(bucket, WeightPayload):
        raise ValueError(f"weight bucket {index}: expected a WeightPayload, got {type(bucket).__name__}")
    for name, tensor in bucket.tensors.items():
        if name in seen:
            raise ValueError(f"weight payload: tensor {name!r} sent twice (bucket {index})")
        seen.add(name)
        if name not in expected.tensors:
            tied = f" (the model ties it to {expected.aliases[name]!r})" if name in expected.aliases else ""
            raise ValueError(f"weight payload: unexpected tensor {name!r}{tied}; the model has no such distinct tensor")
        target = expected.tensors[name]
        if tensor.shape != target.shape or tensor.dtype != target.dtype:
            raise ValueError(f"weight payload: tensor {name!r} is {_describe(tensor)}, the model expects "
                             f"{_describe(target)}")
    return bucket


def load_payload(
    model: torch.nn.Module,
    payload: WeightPayload | Sequence[Any],
    expected_checksum: str,
    fetch: Callable[[Any], WeightPayload] = lambda bucket: bucket,
) -> str:
    """Copy a payload (or a sequence of buckets) into ``model``; returns the checksum recomputed
    from the model afterwards.

    Everything is verified before the first byte is written: names, shapes, dtypes, tie structure
    and the payload checksum against ``expected_checksum``. On any mismatch a one-line
    ``ValueError`` is raised and the model keeps its old weights. The buckets are read twice
    (verify, then copy) through ``fetch``, which may resolve remote references, so at most one
    bucket is held at a time.
    """
    buckets = [payload] if isinstance(payload, WeightPayload) else list(payload)
    expected = state_dict_payload(model)
    seen: set[str] = set()
    digests: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for index, ref in enumerate(buckets):
        bucket = _check_bucket(fetch(ref), index, expected, seen)
        digests.update(tensor_digests(bucket.tensors.items()))
        aliases.update(bucket.aliases)
    missing = sorted(set(expected.tensors) - seen)
    if missing:
        raise ValueError(f"weight payload: missing {len(missing)} tensor(s) the model has, e.g. {missing[:3]}")
    if aliases != expected.aliases:
        raise ValueError(f"weight payload: tied tensors {aliases} differ from the model's {expected.aliases}")
    received = combine_digests(digests, aliases)
    if received != expected_checksum:
        raise ValueError(f"weight payload: checksum {received[:16]}... does not match the expected "
                         f"{expected_checksum[:16]}...; weights not loaded")
    with torch.no_grad():
        for ref in buckets:
            for name, tensor in fetch(ref).tensors.items():
                expected.tensors[name].copy_(tensor)
    return payload_checksum(model)
