"""Token-id lists to padded tensors. Prompts are left-padded (generation appends on the right),
responses right-padded; the model forward then uses explicit position ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _pad(sequences: Sequence[Sequence[int]], pad_token_id: int, left: bool,
         mask_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=mask_dtype)
    for row, seq in enumerate(sequences):
        if seq:
            columns = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, columns] = torch.tensor(seq, dtype=torch.long)
            mask[row, columns] = 1
    return ids, mask


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, P], mask [B, P])`` long mask, every sequence aligned to the right edge."""
    return _pad(sequences, pad_token_id, left=True, mask_dtype=torch.long)


def right_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, T], mask [B, T])`` float mask (the rollout convention), aligned to the left edge."""
    return _pad(sequences, pad_token_id, left=False, mask_dtype=torch.float32)


@dataclass
class SupervisedBatch:
    """Prompts with reference responses, laid out like a rollout so the same forward serves SFT,
    KD and MiniLLM: ``prompt_* [B, P]`` left-padded, ``response_* [B, T]`` right-padded."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def labels(self) -> torch.Tensor:
        """``[B, T]`` response ids with -100 at padding (the CE ignore index)."""
        return self.response_ids.masked_fill(self.response_mask == 0, -100)

    def to(self, device: torch.device | str) -> SupervisedBatch:
        return SupervisedBatch(*(tensor.to(device) for tensor in (self.prompt_ids, self.prompt_mask,
                                                                   self.response_ids, self.response_mask)))


def collate_supervised(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                       pad_token_id: int) -> SupervisedBatch:
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    response_ids, response_mask = right_pad(responses, pad_token_id)
    return SupervisedBatch(prompt_ids, prompt_mask, response_ids, response_mask)
