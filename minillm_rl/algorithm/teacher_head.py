"""The teacher's LM head, for the ``hidden`` teacher signal.

In ``hidden`` mode the rollout workers ship the teacher's final hidden states ``[B, T, d]`` (the
input of its LM head) instead of its log-probabilities ``[B, T, V]``, and the learner applies the
frozen head itself, in vocabulary chunks, inside the full-vocabulary kernels
(:func:`~minillm_rl.algorithm.chunked_vocab.reverse_kl_to_teacher_hidden`,
:func:`~minillm_rl.algorithm.chunked_vocab.soft_cross_entropy_hidden`). This is exact, not an
approximation, as long as the teacher's logits *are* ``hidden @ W^T + b``: :class:`HeadRecorder`
captures what the head receives during the teacher's own forward and refuses a model whose
returned logits differ from the head's output (soft-capped or rescaled logits, e.g. Gemma 2,
Cohere, Granite) or whose head is not a plain ``nn.Linear``.

Bytes per response position fall from ``V`` to ``d`` values (SmolLM2-135M: 49152 / 576 = 85x;
OPT-13B: 50272 / 5120 = 9.8x). The price is on the learner: the head (``V x d``, fp32) is held
once per rank and applied twice per micro-batch and PPO epoch (forward, and again in the backward
instead of keeping ``[N, V]`` teacher logits alive); the workers compute as in ``exact`` mode.

Precision: the hidden states travel in ``sampling.teacher_dist_dtype``. In bf16 each input of a
logit is rounded (relative error up to 2^-8), so every recomputed logit carries an error of the
order of ``2^-8 * sqrt(sum_i (h_i w_vi)^2)``, and the learner then normalises exactly in fp32;
bf16 ``exact`` mode instead rounds each normalised log-prob (absolute error up to
``2^-8 |log p|``, small for the likely tokens). Measured on SmolLM2, 8 x 128 positions
(bench/bench_teacher_signal.py), mean (max) |per-token single-step KL - its fp32 exact value|:
untrained 6-layer student (KL 8.07 nats): bf16 hidden 9.7e-3 (0.10), bf16 log-probs 5.6e-3
(0.052), fp32 hidden 5.4e-5 (7.9e-4, float32 rounding); the teacher in the student's place
(KL 0): bf16 hidden 4.3e-5 (3.2e-4), bf16 log-probs 7.2e-5 (1.2e-4), fp32 hidden 1.9e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NOT_A_LINEAR_HEAD = ("sampling.teacher_dist='hidden' needs a teacher whose logits are a plain linear map of its final "
                     "hidden state (the output of an nn.Linear LM head, returned unchanged); {what}; use "
                     "sampling.teacher_dist=exact")


@dataclass(frozen=True)
class TeacherHead:
    """The frozen teacher LM head: ``logits = hidden @ weight.T + bias``.

    ``weight``: ``[V, d]``; ``bias``: ``[V]`` or None. Never trained: no gradient flows into it.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def __post_init__(self):
        if self.weight.dim() != 2:
            raise ValueError(f"TeacherHead: weight must be [vocab, hidden], got shape {tuple(self.weight.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[0],):
            raise ValueError(f"TeacherHead: bias must be [{self.weight.shape[0]}], got {tuple(self.bias.shape)}")

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @classmethod
    def from_model(cls, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> TeacherHead:
        """A detached copy (in ``dtype``) of ``model``'s LM head, refused unless it is a plain ``nn.Linear``."""
        head = _linear_head(model)
        return cls(head.weight.detach().to(dtype, copy=True),
                   None if head.bias is None else head.bias.detach().to(dtype, copy=True))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TeacherHead:
        return TeacherHead(self.weight.to(device=device, dtype=dtype),
                           None if self.bias is None else self.bias.to(device=device, dtype=dtype))

    def logits(self, hidden: torch.Tensor, columns: slice = slice(None)) -> torch.Tensor:
        """``[n, c]`` logits of vocabulary ``columns`` for ``hidden [n, d]``, in ``hidden``'s dtype."""
        weight = self.weight[columns].to(hidden.dtype)
        if self.bias is None:
            return hidden @ weight.T
        return torch.addmm(self.bias[columns].to(hidden.dtype), hidden, weight.T)


@dataclass(frozen=True)
class HiddenTeacher:
    """The teacher as final hidden states plus its head: the ``hidden`` form of a teacher
    distribution (``hidden``: ``[B, T, d]``, position ``t``'s distribution is
    ``softmax(head.logits(hidden[:, t]))``)."""

    hidden: torch.Tensor
    head: TeacherHead


def _linear_head(model: torch.nn.Module) -> torch.nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise ValueError(NOT_A_LINEAR_HEAD.format(what=f"its output embeddings are a {type(head).__name__}"))
    return head


class HeadRecorder:
    """Records, during ``model``'s forwards inside the ``with`` block, what its LM head receives
    (the final hidden states, after the last norm) and returns.

    :meth:`hidden_for` hands out the recorded input only after checking that the logits the model
    returned are exactly the head's output: a model that transforms them afterwards is refused in
    one line (see :data:`NOT_A_LINEAR_HEAD`).
    """

    def __init__(self, model: torch.nn.Module):
        self.head = _linear_head(model)
        self._handle = None
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    def __enter__(self) -> HeadRecorder:
        self._handle = self.head.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _record(self, module, args, output) -> None:
        self._input, self._output = args[0], output

    def hidden_for(self, logits: torch.Tensor, positions: slice = slice(None)) -> torch.Tensor:
        """The head input ``[B, N, d]`` behind ``logits [B, N, V]``, which the last forward must
        have returned as the head's output at ``positions`` (of the head's position axis, -2)."""
        if self._output is None:
            raise ValueError(NOT_A_LINEAR_HEAD.format(what="its LM head was not called in the forward"))
        output = self._output[..., positions, :]
        if output.shape != logits.shape or not torch.equal(output.to(logits.dtype), logits):
            raise ValueError(NOT_A_LINEAR_HEAD.format(
                what=f"its {type(self.head).__name__} head's output and the logits it returns differ (soft-capped "
                     f"or scaled logits?)"))
        hidden = self._input[..., positions, :]
        self._input = self._output = None
        return hidden
