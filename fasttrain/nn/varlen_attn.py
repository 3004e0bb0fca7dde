"""VarlenAttention: attention over packed sequences as a module."""
from __future__ import annotations

from torch import Tensor, nn

from fasttrain.ops.varlen_attn import varlen_attention


class VarlenAttention(nn.Module):
    """Softmax attention over packed sequences (no projections), options fixed at construction.

    forward(q, k, v, cu_seqlens_q, cu_seqlens_k=None): q (total_q, nheads, headdim),
    k/v (total_k, nheads_k, headdim), cu_seqlens int32 (batch + 1,); cu_seqlens_k defaults to
    cu_seqlens_q (self-attention). See ``fasttrain.ops.varlen_attention``.
    """

    def __init__(self, causal: bool = False, softmax_scale: float | None = None,
                 window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, *,
                 backend: str | None = None):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.window_size = tuple(window_size)
        self.softcap = softcap
        self.backend = backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                cu_seqlens_k: Tensor | None = None, max_seqlen_q: int | None = None,
                max_seqlen_k: int | None = None, return_lse: bool = False):
        if cu_seqlens_k is None:
            cu_seqlens_k = cu_seqlens_q
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                softmax_scale=self.softmax_scale, causal=self.causal,
                                window_size=self.window_size, softcap=self.softcap,
                                return_lse=return_lse, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, window_size={self.window_size}, softcap={self.softcap}, "
                f"softmax_scale={self.softmax_scale}")
