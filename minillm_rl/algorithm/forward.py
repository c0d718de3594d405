"""The learner-side forward pass over a rollout: student logits at the response positions."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` positions that skip left padding (HF models count pads otherwise)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Logits that predict each response token.

    Args:
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts.
        response_ids, response_mask: ``[B, T]`` right-padded responses.

    Returns:
        ``[B, T, V]`` logits; row ``t`` predicts ``response_ids[:, t]``. Only the last ``T + 1``
        positions go through the LM head, so no ``[B, P + T, V]`` tensor is built.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), (response_mask > 0).long()], dim=1)
    response_len = response_ids.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=response_len + 1,
    )
    return out.logits[:, :-1]
