"""Between padded batches and packed (varlen) form.

Padded: ``(batch, seqlen, ...)`` with an attention mask ``(batch, seqlen)`` (1/True = token,
padding on either side). Packed: ``(total_tokens, ...)`` plus ``cu_seqlens`` ``(batch + 1,)``
int32. These helpers read lengths on the host (the packed size depends on the data).
"""
from __future__ import annotations

import torch
from torch import Tensor


def cu_seqlens_from_lengths(lengths: Tensor) -> Tensor:
    """cu_seqlens int32 (batch + 1,) from sequence lengths (batch,), on their device."""
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def cu_seqlens_from_mask(attention_mask: Tensor) -> tuple[Tensor, int]:
    """(cu_seqlens int32 (batch + 1,), max_seqlen) from a (batch, seqlen) attention mask."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seqlen), got "
                         f"{tuple(attention_mask.shape)}")
    lengths = attention_mask.bool().sum(-1, dtype=torch.int32)
    return cu_seqlens_from_lengths(lengths), int(lengths.max()) if lengths.numel() else 0


def cu_seqlens_from_position_ids(position_ids: Tensor) -> tuple[Tensor, int]:
    """(cu_seqlens, max_seqlen) of packed rows whose position ids restart at 0 for each
    sequence (what ``DataCollatorWithFlattening`` produces). position_ids: (batch, seqlen) or
    (seqlen,); rows are concatenated, each starting a sequence (so each must start at 0)."""
    if position_ids.dim() not in (1, 2):
        raise ValueError(f"position_ids must be (seqlen,) or (batch, seqlen), got "
                         f"{tuple(position_ids.shape)}")
    if position_ids.numel() == 0:
        return torch.zeros(1, dtype=torch.int32, device=position_ids.device), 0
    rows = position_ids.reshape(-1, position_ids.shape[-1])
    if bool((rows[:, 0] != 0).any()):
        raise ValueError("position_ids must start at 0 in every row (each sequence's positions "
                         "restart at 0, and a sequence does not continue into the next row)")
    pos = rows.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten().to(torch.int32)
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])])
    return cu, int((cu[1:] - cu[:-1]).max())


def unpad(hidden_states: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """hidden_states (batch, seqlen, ...) -> (packed (total, ...), indices (total,) into the
    flattened batch*seqlen positions, cu_seqlens int32, max_seqlen)."""
    if hidden_states.shape[:2] != attention_mask.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} does not start with the "
                         f"attention mask's shape {tuple(attention_mask.shape)}")
    indices = torch.nonzero(attention_mask.reshape(-1).bool()).flatten()
    cu, max_seqlen = cu_seqlens_from_mask(attention_mask)
    packed = hidden_states.reshape(-1, *hidden_states.shape[2:])[indices]
    return packed, indices, cu, max_seqlen


def pad(packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Inverse of ``unpad``: (total, ...) -> (batch, seqlen, ...), zeros at the padding."""
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out = out.index_put((indices,), packed)  # differentiable, out of place
    return out.view(batch, seqlen, *packed.shape[1:])
