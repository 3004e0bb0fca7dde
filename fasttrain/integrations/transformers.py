"""Hugging Face transformers: ``attn_implementation="fasttrain"`` runs fasttrain's varlen attention.

    from fasttrain.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fasttrain")

Three input layouts reach the attention function, as with FlashAttention 2 in transformers:
- a padded batch with a 2-D attention mask: the tokens are unpadded, attended as packed
  sequences and padded back (padding positions get zeros); in non-causal attention without a
  window only the keys are unpadded and every query attends, as with sdpa (cross-attention's
  mask is the encoder's: it does not say which decoder tokens are real);
- packed rows (``DataCollatorWithFlattening``): ``cu_seq_lens_q/k`` in the model kwargs
  (``return_flash_attn_kwargs=True``; no host sync), or position ids that restart (a sequence
  starts wherever a position is not the previous one + 1, in any row, as with sdpa; one host
  read per forward, shared by all layers);
- a batch without padding: equal lengths (no host sync unless position ids are given per row).
Sliding windows (``sliding_window`` of Mistral/Qwen2/Gemma layers: the query and the
``sliding_window - 1`` keys on each side, the right side cut when causal; in non-causal layers
whose mask is transformers' inclusive two-sided window, Gemma 4's or T5Gemma's, that mask's
width), GQA, logit softcap
(Gemma 2) and value head dims smaller than the query's (MLA) come from the modules; static KV
caches (generation) are masked to the tokens seen so far.
transformers is imported lazily; it is never a dependency of fasttrain.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fasttrain.ops.padding import cu_seqlens_from_lengths, pad
from fasttrain.ops.varlen_attn import varlen_attention

NAME = "fasttrain"
_POSITION_CU = WeakIdKeyDictionary()  # position_ids tensor -> (version, cu_seqlens or None)
_UNPAD = WeakIdKeyDictionary()  # 2-D attention mask -> (version, {q_len: unpad data})
# model config -> the half-width of its masks' two-sided sliding window, inclusive (transformers'
# sliding_window_bidirectional_overlay: |q - kv| <= w, wider by one than sliding_window - 1)
_TWO_SIDED = WeakIdKeyDictionary()
# attention-function kwargs of patterns fasttrain does not compute (refused, never dropped):
# T5-style relative position bias, attention sinks, sparse (DSA/NSA) key indices
_UNSUPPORTED = ("position_bias", "sinks", "indices", "block_indices")


def register(name: str = NAME, *, backend: str | None = None) -> str:
    """Register ``name`` as an attention implementation (and its mask, FlashAttention 2's
    2-D padding mask) with transformers; returns the name to pass as ``attn_implementation``.
    ``backend`` forces a fasttrain backend ("triton" or "torch"; default: Triton for CUDA
    tensors, the reference on CPU)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def attention(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, backend=backend,
                                 **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, padding_mask)
    return name


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                 mask_function=None, attention_mask: torch.Tensor | None = None,
                 device=None, **kwargs) -> torch.Tensor | None:
    """FlashAttention 2's mask (the 2-D padding mask, or None when there is no padding), except
    that in causal masks keys beyond the tokens seen so far (the empty slots of a static cache)
    are masked too: transformers' generate() drops all-ones masks for implementations it does
    not know as flash, which would otherwise let queries attend to those slots. Bidirectional
    masks (transformers passes them ``allow_is_bidirectional_skip``) are left as they are:
    for cross-attention, kv_length is the encoder's length, not a cache's.

    Patterns a 2-D mask cannot carry are refused rather than dropped: what ``_overlay`` finds
    in the mask function (image blocks, prefix LMs, custom overlays) and chunked attention
    (Llama 4's ``attention_chunk_size``) longer than one chunk."""
    from transformers.masking_utils import flash_attention_mask

    config = kwargs.get("config")
    overlay = _overlay(mask_function, bool(kwargs.get("use_vmap")), config, batch_size,
                       kv_length, device)
    if overlay is not None:
        raise NotImplementedError(
            f"attn_implementation='fasttrain' supports padding, packing, causal and "
            f"sliding-window masks only; this model adds {overlay}")
    chunk = getattr(config, "attention_chunk_size", None)
    layer_types = getattr(config, "layer_types", None)
    if (chunk is not None and (layer_types is None or "chunked_attention" in layer_types)
            and int(kv_offset) + kv_length > chunk):
        raise NotImplementedError(
            f"attn_implementation='fasttrain' has no chunked attention: the model's "
            f"attention_chunk_size ({chunk}) is shorter than the {int(kv_offset) + kv_length} "
            f"tokens attended")
    mask = flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                mask_function, attention_mask, **kwargs)
    if mask is None and "allow_is_bidirectional_skip" not in kwargs:
        seen = int(q_offset) + q_length  # a tensor for static caches: one host read
        if seen < kv_length:
            mask = torch.ones(batch_size, seen, dtype=torch.bool, device=device)
    return mask


# transformers' mask pieces: combinators (walked into), and the patterns computed here from the
# mask, the modules' is_causal/sliding_window and the packing (the rest of a mask is refused)
_COMBINATORS = ("and_masks.", "or_masks.", "remap_positions_for_packed_sequence.",
                "add_offsets_to_mask_function.")
_COMPUTED = ("causal_mask_function", "bidirectional_mask_function", "sliding_window_overlay.",
             "sliding_window_bidirectional_overlay.", "padding_mask_function.",
             "packed_sequence_mask_function.", "chunked_overlay.")


def _leaves(fn, depth: int = 8):
    """The functions a transformers mask function is built from (through its combinators'
    closures; one nested deeper than ``depth`` is yielded as it is, a piece not known)."""
    if not callable(fn):
        return
    if depth == 0 or not getattr(fn, "__qualname__", "").startswith(_COMBINATORS):
        yield fn
        return
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        for v in value if isinstance(value, (tuple, list)) else (value,):
            yield from _leaves(v, depth - 1)


def _closure_value(fn, name: str):
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    return fn.__closure__[names.index(name)].cell_contents if name in names else None


def _overlay(mask_function, use_vmap: bool, config, batch_size: int, kv_length: int,
             device) -> str | None:
    """What a mask adds that a packed attention here does not compute, or None. Blocks of
    bidirectional tokens (PaliGemma's prefix, Gemma 3's images: ``blockwise_overlay``) count
    only when a token is in one (one host read, for the models that pass them); other
    overlays (transformers sets ``use_vmap`` for or/and mask functions) count unless every
    piece is one computed here. ``use_bidirectional_attention`` True or "all" (Gemma 3's and
    Gemma 4's bidirectional models, PaliGemma) makes the modules non-causal, which is right
    where the mask is two-sided too, not where it stays causal outside blocks (PaliGemma's
    prefix LM): the mask must be symmetric between each token and the next (one host read)."""
    leaves = list(_leaves(mask_function))
    for fn in leaves:
        if getattr(fn, "__qualname__", "").startswith("sliding_window_bidirectional_overlay.") \
                and config is not None:
            _TWO_SIDED[config] = _closure_value(fn, "sliding_window")
    bidirectional = getattr(config, "use_bidirectional_attention", False)
    if bidirectional is True or bidirectional == "all":
        if kv_length < 2 or mask_function is None:
            return None
        b = torch.arange(batch_size, device=device)[:, None]
        q = torch.arange(kv_length - 1, device=device)[None, :]
        try:
            ahead, behind = (torch.as_tensor(mask_function(b, 0, i, j))
                             for i, j in ((q, q + 1), (q + 1, q)))
        except Exception as e:  # noqa: BLE001 - a mask function not written for index tensors
            return f"a mask function that cannot be read here ({type(e).__name__}: {e})"
        if bool((ahead == behind).all()):
            return None
        return "a mask that stays causal over non-causal modules (a prefix LM)"
    for fn in leaves:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        if name.startswith("blockwise_overlay."):
            ids = _closure_value(fn, "block_sequence_ids")
            if not isinstance(ids, torch.Tensor) or bool((ids >= 0).any()):
                return ("blocks of bidirectional tokens (block_sequence_ids, e.g. an image; "
                        "text-only batches of a multimodal model are fine)")
        elif use_vmap and not name.startswith(_COMPUTED):
            return f"a custom mask overlay ({name})"
    return None


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _packed_cu(position_ids: torch.Tensor, batch: int) -> torch.Tensor | None:
    """cu_seqlens over the flattened batch of packed rows, or None when every row is one plain
    sequence. A sequence starts at each row's start and wherever a position does not continue
    the previous one by +1, as transformers' sdpa mask reads packed position ids (its
    ``find_packed_sequence_indices``). Read once per position_ids tensor (one host sync per
    forward; a graph break under torch.compile): every layer gets the same one."""
    version = _version(position_ids)
    hit = _POSITION_CU.get(position_ids) if version is not None else None
    if hit is not None and hit[0] == version and hit[1] == batch:
        return hit[2]
    pos = position_ids.reshape(batch, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos.diff(dim=-1) != 1
    cu = None
    if bool(starts[:, 1:].any()):
        index = torch.nonzero(starts.reshape(-1)).flatten().to(torch.int32)
        cu = torch.cat([index, index.new_tensor([starts.numel()])])
    if version is not None:
        _POSITION_CU[position_ids] = (version, batch, cu)
    return cu


def _unpad_data(attention_mask: torch.Tensor, q_len: int):
    """(q indices, cu_seqlens_q, k indices, cu_seqlens_k) of a 2-D padding mask, computed once
    per mask tensor and query length (the layers of one forward share the mask)."""
    version = _version(attention_mask)
    entry = _UNPAD.get(attention_mask) if version is not None else None
    if entry is None or entry[0] != version:
        entry = (version, {})
        if version is not None:
            _UNPAD[attention_mask] = entry
    if q_len not in entry[1]:
        mask = attention_mask.bool()
        q_mask = mask[:, -q_len:]
        entry[1][q_len] = (torch.nonzero(q_mask.reshape(-1)).flatten(),
                           cu_seqlens_from_lengths(q_mask.sum(-1, dtype=torch.int32)),
                           torch.nonzero(mask.reshape(-1)).flatten(),
                           cu_seqlens_from_lengths(mask.sum(-1, dtype=torch.int32)))
    return entry[1][q_len]


def _arange_cu(batch: int, seqlen: int, device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, s_aux: torch.Tensor | None = None,
                      backend: str | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (batch, heads, q_len, d), key/value
    (batch, kv_heads, kv_len, d or d_v), attention_mask None or (batch, seen) bool.
    Returns ((batch, q_len, heads, d_v), None): no attention weights."""
    if dropout and module.training:
        raise NotImplementedError(
            f"attn_implementation='fasttrain' has no attention dropout (p={dropout} in "
            f"training): set the model's attention dropout probability to 0 in its config")
    if s_aux is not None:
        raise NotImplementedError("attn_implementation='fasttrain' does not support attention "
                                  "sinks (s_aux)")
    unsupported = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"attn_implementation='fasttrain' does not support "
                                  f"{', '.join(unsupported)} (passed by this model's attention)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation='fasttrain' takes a 2-D padding mask (batch, kv_len) from its "
            f"mask interface; got a {attention_mask.dim()}-D mask "
            f"{tuple(attention_mask.shape)} (a custom mask prepared outside transformers' mask "
            f"functions: pass the 2-D mask, or position ids / cu_seq_lens for packed rows)")
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='fasttrain' cannot return attention weights")
    batch, nheads, q_len, head_dim = query.shape
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, len, heads, d)
    if k.dtype != q.dtype or v.dtype != q.dtype:  # e.g. fp32 layer norms feeding q (peft)
        k, v = k.to(q.dtype), v.to(q.dtype)
    v_dim = v.shape[-1]
    if v_dim != head_dim:  # e.g. MLA: pad the values to the query head dim, crop the output
        v = torch.nn.functional.pad(v, (0, head_dim - v_dim))
    causal = module.is_causal if is_causal is None else is_causal
    # sliding_window: the query and the sliding_window - 1 keys on each side (the right side is
    # cut to 0 when causal), as transformers' FlashAttention path; a two-sided window the
    # model's mask makes inclusive (|q - kv| <= w, read by padding_mask) as that mask
    window = (sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1)
    config = getattr(module, "config", None)
    inclusive = _TWO_SIDED.get(config) if sliding_window and config is not None else None
    if inclusive is not None and not causal:
        window = (inclusive, inclusive)
    options = dict(softmax_scale=scaling, causal=causal, window_size=window,
                   softcap=softcap or 0.0, backend=backend)

    def attend(q_packed, k_packed, v_packed, cu_q, cu_k):
        return varlen_attention(q_packed, k_packed, v_packed, cu_q, cu_k, **options)[..., :v_dim]

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if (cu_q is None) != (cu_k is None):
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be given together")
    flat = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    if attention_mask is not None:  # padded batch (keys past the mask: empty cache slots)
        k, v = k[:, :attention_mask.shape[-1]], v[:, :attention_mask.shape[-1]]
        q_index, cu_q, k_index, cu_k = _unpad_data(attention_mask, q_len)
        k_packed = k.reshape(-1, *k.shape[2:])[k_index]
        v_packed = v.reshape(-1, *v.shape[2:])[k_index]
        if not causal and window == (-1, -1):
            # every query attends, as with sdpa: in cross-attention the mask is the encoder's,
            # which says nothing of the decoder's queries (even at equal lengths); for an
            # encoder's own padded queries this costs their compute only
            out = attend(flat[0], k_packed, v_packed, _arange_cu(batch, q_len, q.device), cu_k)
            return out.view(batch, q_len, nheads, v_dim), None
        # the queries are the mask's last q_len tokens (padding on either side; with a cache,
        # left padding, as FlashAttention 2's path assumes)
        out = attend(flat[0][q_index], k_packed, v_packed, cu_q, cu_k)
        return pad(out, q_index, batch, q_len), None
    if cu_q is not None:  # packed sequences, FlashAttention kwargs
        out = attend(*flat, cu_q.int(), cu_k.int())
        return out.view(batch, q_len, nheads, v_dim), None
    position_ids = kwargs.get("position_ids")
    # one row of position ids per row of tokens (not a (1, L) row shared by a batch, which
    # transformers makes by default: reading it would cost a host sync for nothing; nor
    # multimodal rope's (3, 1, L) positions, replaced here by the text positions in 5.x)
    if (q_len == k.shape[1] and q_len > 1 and position_ids is not None
            and position_ids.shape[-1] == q_len and position_ids.numel() == batch * q_len):
        cu = _packed_cu(position_ids, batch)
        if cu is not None:  # packed rows, sequences found from the position ids
            return attend(*flat, cu, cu).view(batch, q_len, nheads, v_dim), None
    out = attend(*flat, _arange_cu(batch, q_len, q.device), _arange_cu(batch, k.shape[1], q.device))
    return out.view(batch, q_len, nheads, v_dim), None
