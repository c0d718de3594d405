"""Records pickled with tensors as raw bytes (minillm_rl/tensor_pickle.py): what Ray ships."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass

import torch

from minillm_rl.runtime.weights import WeightPayload, payload_checksum
from minillm_rl.tensor_pickle import TensorsAsArrays


@dataclass
class Record(TensorsAsArrays):
    values: torch.Tensor
    by_name: dict
    scalar: torch.Tensor
    missing: torch.Tensor | None
    label: str


def _record() -> Record:
    return Record(values=torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).transpose(1, 2),  # not contiguous
                  by_name={"bf16": torch.linspace(-3, 3, 7, dtype=torch.bfloat16), "ids": torch.tensor([[1, 2]])},
                  scalar=torch.tensor(2.5, dtype=torch.float64), missing=None, label="x")


def _out_of_band(obj, read_only: bool):
    """Pickle protocol 5 with out-of-band buffers, as Ray's object store does; the receiver gets
    read-only views of the sender's buffers (Ray maps its shared memory read-only)."""
    buffers = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    views = [memoryview(b.raw()).toreadonly() if read_only else b.raw() for b in buffers]
    return pickle.loads(data, buffers=views), len(buffers)


def _assert_equal(got: Record, sent: Record) -> None:
    assert got.label == "x" and got.missing is None
    for mine, theirs in [(got.values, sent.values), (got.scalar, sent.scalar),
                         *[(got.by_name[k], sent.by_name[k]) for k in sent.by_name]]:
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and torch.equal(mine, theirs)


def test_tensors_travel_as_out_of_band_bytes_and_arrive_writable():
    sent = _record()
    got, num_buffers = _out_of_band(sent, read_only=True)
    assert num_buffers == 4  # every tensor went out of band: no re-encoding inside the pickle stream
    _assert_equal(got, sent)
    got.values.add_(1)  # the receiver owns writable memory, not a view of the (read-only) buffer
    got.by_name["bf16"].zero_()
    assert torch.equal(sent.values, _record().values) and torch.equal(sent.by_name["bf16"], _record().by_name["bf16"])


def test_in_band_pickle_and_deepcopy_give_independent_equal_copies():
    sent = _record()
    for got in (pickle.loads(pickle.dumps(sent)), copy.deepcopy(sent)):
        _assert_equal(got, sent)
        got.by_name["ids"][0, 0] = 9
        assert sent.by_name["ids"][0, 0] == 1


def test_weight_payload_round_trip_keeps_checksum_and_aliases():
    payload = WeightPayload({"a": torch.randn(3, 5), "b": torch.randn(4).to(torch.bfloat16)}, {"c": "a"})
    got, _ = _out_of_band(payload, read_only=True)
    assert got.aliases == {"c": "a"} and payload_checksum(got) == payload_checksum(payload)
