"""Hugging Face transformers: ``attn_implementation="fasttrain"`` runs fasttrain's varlen attention.

    from fasttrain.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fasttrain")

Three input layouts reach the attention function, as with FlashAttention 2 in transformers:
- a padded batch with a 2-D attention mask: the tokens are unpadded, attended as packed
  sequences and padded back (padding positions get zeros);
- a packed row from ``DataCollatorWithFlattening``: ``cu_seq_lens_q/k`` in the model kwargs
  (``return_flash_attn_kwargs=True``; no host sync), or position ids restarting at 0 (one host
  read per forward, shared by all layers);
- a batch without padding: equal lengths, no host sync.
Sliding windows (``sliding_window`` of Mistral/Qwen2 layers: the query and the
``sliding_window - 1`` keys before it), GQA and logit softcap (Gemma 2) come from the modules.
transformers is imported lazily; it is never a dependency of fasttrain.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fasttrain.ops.padding import cu_seqlens_from_position_ids, pad, unpad
from fasttrain.ops.varlen_attn import varlen_attention

NAME = "fasttrain"
_POSITION_CU = WeakIdKeyDictionary()  # position_ids tensor -> (version, cu_seqlens)


def register(name: str = NAME, *, backend: str | None = None) -> str:
    """Register ``name`` as an attention implementation (and its mask, FlashAttention 2's
    2-D padding mask) with transformers; returns the name to pass as ``attn_implementation``.
    ``backend`` forces a fasttrain backend ("triton" or "torch"; default: Triton for CUDA
    tensors, the reference on CPU)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    def attention(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, backend=backend,
                                 **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def _cu_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens of a packed row, read once per position_ids tensor (all layers share it)."""
    hit = _POSITION_CU.get(position_ids)
    if hit is not None and hit[0] == position_ids._version:
        return hit[1]
    cu, _ = cu_seqlens_from_position_ids(position_ids)
    _POSITION_CU[position_ids] = (position_ids._version, cu)
    return cu


def _arange_cu(batch: int, seqlen: int, device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, s_aux: torch.Tensor | None = None,
                      backend: str | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (batch, heads, q_len, d), key/value
    (batch, kv_heads, kv_len, d), attention_mask None or (batch, kv_len) bool.
    Returns ((batch, q_len, heads, d), None): no attention weights."""
    if dropout and module.training:
        raise NotImplementedError("attn_implementation='fasttrain' has no attention dropout; "
                                  "set the config's attention_dropout to 0")
    if s_aux is not None:
        raise NotImplementedError("attn_implementation='fasttrain' does not support attention "
                                  "sinks (s_aux)")
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='fasttrain' cannot return attention weights")
    batch, nheads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, len, heads, d)
    if k.dtype != q.dtype or v.dtype != q.dtype:  # e.g. fp32 layer norms feeding q (peft)
        k, v = k.to(q.dtype), v.to(q.dtype)
    causal = module.is_causal if is_causal is None else is_causal
    options = dict(softmax_scale=scaling, causal=causal,
                   window_size=(sliding_window - 1, -1) if sliding_window else (-1, -1),
                   softcap=softcap or 0.0, backend=backend)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None:  # padded batch
        q_packed, q_index, cu_q, _ = unpad(q, attention_mask[:, -q_len:])
        k_packed, k_index, cu_k, _ = unpad(k, attention_mask)
        v_packed = v.reshape(-1, *v.shape[2:])[k_index]
        out = varlen_attention(q_packed, k_packed, v_packed, cu_q, cu_k, **options)
        return pad(out, q_index, batch, q_len), None
    if batch == 1 and q_len == kv_len and (cu_q is not None or position_ids is not None):
        if cu_q is None:  # packed row, sequences found from position ids restarting at 0
            cu_q = cu_k = _cu_from_position_ids(position_ids)
        out = varlen_attention(q[0], k[0], v[0], cu_q.int(), cu_k.int(), **options)
        return out[None], None
    out = varlen_attention(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                           v.reshape(-1, *v.shape[2:]), _arange_cu(batch, q_len, q.device),
                           _arange_cu(batch, kv_len, q.device), **options)
    return out.view(batch, q_len, nheads, head_dim), None
