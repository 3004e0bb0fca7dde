"""attn_implementation="fasttrain" in Hugging Face models: the same outputs and gradients as
``sdpa`` (``eager`` for Gemma 2) on tiny random-init Llama-, Mistral-, Qwen2- and Gemma2-style
models, for padded, unpadded and packed batches; and peft's fuse_lora inside a full model."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fasttrain.integrations.transformers import register  # noqa: E402
from fasttrain.optim import AdamW  # noqa: E402
from conftest import devices  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=256, attention_dropout=0.0)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=1,
                                                  sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2,
                                              use_sliding_window=True, sliding_window=6,
                                              max_window_layers=1),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=16,
                                                sliding_window=8, attn_logit_softcapping=5.0,
                                                final_logit_softcapping=None),
}
BASELINE = {"gemma2": "eager"}  # logit softcap: transformers runs Gemma 2 eagerly for it


def models(arch, name="fasttrain", dtype=torch.float32):
    """(baseline model, fasttrain model) with the same random weights."""
    torch.manual_seed(0)
    cfg = CONFIGS[arch]()
    ref = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation=BASELINE.get(arch, "sdpa")).to(dtype)
    fast = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation=name).to(dtype)
    fast.load_state_dict(ref.state_dict())
    assert fast.config._attn_implementation == name
    return ref.eval(), fast.eval()


@pytest.fixture(scope="module", autouse=True)
def registered():
    register()
    register("fasttrain-triton", backend="triton")  # the kernels, under the interpreter on CPU


def padded_batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 20), generator=gen)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, 15:] = 0  # right padding
    mask[2, :7] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("arch", CONFIGS)
def test_unpadded_and_padded_batches_match_the_baseline(arch):
    ref, fast = models(arch)
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
        got, expected = fast(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    real = mask.bool()  # padding positions are not compared (fasttrain writes zeros there)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,lengths", [(arch, (5, 13, 1, 9)) for arch in CONFIGS]
                         + [("llama", (1, 6)), ("llama", (1, 1, 5))])  # no position decreases
def test_packed_rows_match_each_sequence_alone(arch, lengths):
    ref, fast = models(arch)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 128, (n,), generator=gen) for n in lengths]
    expected = torch.cat([ref(s[None]).logits[0] for s in seqs]).detach()
    # position ids restarting at 0
    packed = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        got = fast(packed, position_ids=position_ids).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # transformers' DataCollatorWithFlattening with FlashAttention kwargs (no host sync)
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collate([{"input_ids": s.tolist()} for s in seqs])
    assert "cu_seq_lens_q" in batch
    with torch.no_grad():
        got = fast(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_gradients_match_the_baseline_on_a_padded_batch():
    ref, fast = models("mistral")
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (ref, fast):
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_triton_kernels_in_a_model():
    ref, fast = models("llama", name="fasttrain-triton")
    ids, mask = padded_batch()
    with torch.no_grad():
        got, expected = fast(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_bf16_error_within_twice_the_sdpa_bf16_error(device):
    # the Triton kernels (forced: "fasttrain" alone takes the fp32 reference for CPU tensors)
    ref32, _ = models("llama")
    ref16, fast16 = models("llama", name="fasttrain-triton", dtype=torch.bfloat16)
    ref32, ref16, fast16 = (m.to(device) for m in (ref32, ref16, fast16))
    ids, mask = (t.to(device) for t in padded_batch())
    real = mask.bool()
    with torch.no_grad():
        truth = ref32(ids, attention_mask=mask).logits[real].double()
        err_fast = (fast16(ids, attention_mask=mask).logits[real].double() - truth).abs().max()
        err_sdpa = (ref16(ids, attention_mask=mask).logits[real].double() - truth).abs().max()
    assert err_fast <= 2 * err_sdpa + 1e-3 * truth.abs().max(), (err_fast, err_sdpa)


def test_attention_dropout_in_training_is_refused():
    cfg = transformers.LlamaConfig(**dict(SMALL, attention_dropout=0.1), num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="fasttrain")
    with pytest.raises(NotImplementedError, match="attention dropout"):
        model.train()(torch.randint(0, 128, (1, 8)))


def test_fuse_lora_inside_a_model_and_training():
    peft = pytest.importorskip("peft")
    from fasttrain.integrations.peft import fuse_lora

    _, base = models("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    before = model(ids, attention_mask=mask, labels=labels)
    before.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    report = fuse_lora(model)
    assert report.n_fused == 4 and report.n_not_fused == 0  # q_proj and v_proj of 2 layers
    after = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-4, atol=1e-5)
    after.loss.backward()
    for name, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, rtol=1e-4,
                                   atol=1e-6, msg=name)

    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert report.undo() == 4


def test_from_pretrained(tmp_path):
    ref, _ = models("qwen2")
    ref.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                               attn_implementation="fasttrain")
    assert loaded.config._attn_implementation == "fasttrain"
    ids, mask = padded_batch()
    with torch.no_grad():
        got, expected = (m(ids, attention_mask=mask).logits for m in (loaded.eval(), ref))
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("left_padding", [False, True])
def test_generation_with_a_static_cache_matches_sdpa(left_padding):
    ref, fast = models("llama")
    ids, mask = padded_batch()
    mask = mask[:2] if left_padding else torch.ones_like(ids[:2])
    if left_padding:
        mask[0] = torch.tensor([0] * 5 + [1] * 15)  # generate expects left padding
    kwargs = dict(max_new_tokens=4, do_sample=False, cache_implementation="static",
                  output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    got = fast.generate(ids[:2], attention_mask=mask, **kwargs)
    expected = ref.generate(ids[:2], attention_mask=mask, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def bart_models():
    """(sdpa, fasttrain) tiny Bart models with the same random weights: an encoder-decoder
    (encoder self-attention, decoder self-attention, cross-attention)."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=100, d_model=32, encoder_layers=1,
                                  decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
                                  attention_dropout=0.0, activation_dropout=0.0)
    cls = transformers.BartForConditionalGeneration
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    fast = cls._from_config(copy.deepcopy(cfg), attn_implementation="fasttrain").eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("dec_len", [5, 12])
@pytest.mark.parametrize("padded", [False, True])
def test_cross_attention_matches_sdpa(dec_len, padded):
    # the encoder's mask must neither cut the encoder keys to the decoder's length (no
    # padding) nor pick the decoder's queries (padding; at equal lengths too)
    ref, fast = bart_models()
    gen = torch.Generator().manual_seed(7)
    enc = torch.randint(3, 100, (2, 12), generator=gen)
    dec = torch.randint(3, 100, (2, dec_len), generator=gen)
    mask = torch.ones_like(enc)
    if padded:
        mask[0, 8:] = 0  # right padding
        mask[1, :3] = 0  # left padding
    with torch.no_grad():
        got, expected = (m(input_ids=enc, attention_mask=mask, decoder_input_ids=dec).logits
                         for m in (fast, ref))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_encoder_decoder_generation_matches_sdpa():
    ref, fast = bart_models()
    enc = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(enc)
    mask[0, 9:] = 0
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=1, output_scores=True,
                  return_dict_in_generate=True)
    got = fast.generate(enc, attention_mask=mask, **kwargs)
    expected = ref.generate(enc, attention_mask=mask, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_batch_of_one_with_offset_positions_and_inference_mode():
    ref, fast = models("llama")
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    position_ids = torch.arange(5, 15)[None]  # one sequence, positions not starting at 0
    with torch.inference_mode():  # inference tensors have no version counter
        got = fast(ids, position_ids=position_ids).logits
        expected = ref(ids, position_ids=position_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


class _Attention(torch.nn.Module):
    is_causal = False


def _attend(query, key, value, **kwargs):
    from fasttrain.integrations.transformers import attention_forward

    return attention_forward(_Attention(), query, key, value, None, **kwargs)[0]


def _sdpa(query, key, value, mask):
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                           enable_gqa=True)
    return out.transpose(1, 2)


def test_multimodal_rope_positions_are_not_read_as_packing():
    """(3, 1, L) position ids (one row per rope section, as Qwen2-VL's transformers 4 passes
    them) are one sequence, not three packed ones over 3L tokens."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    position_ids = torch.arange(12).expand(3, 1, 12)
    torch.testing.assert_close(_attend(q, k, v, position_ids=position_ids), _sdpa(q, k, v, None))


def test_bidirectional_sliding_window_is_two_sided():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 12, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    expected = _sdpa(q, k, v, (i - j).abs() < 3)  # transformers' bidirectional window of 3
    torch.testing.assert_close(_attend(q, k, v, sliding_window=3), expected)


def test_value_head_dim_smaller_than_query_head_dim():
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 4, 9, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(_attend(q, k, v), _sdpa(q, k, v, None))


def test_flash_attention_kwargs_are_honoured_for_any_batch_shape():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 6, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 4, 9, 12], dtype=torch.int32)  # sequences across the two rows
    got = _attend(q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu).reshape(12, 2, 16)
    flat = [t.transpose(1, 2).reshape(12, 2, 16) for t in (q, k, v)]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = [t[s:e].transpose(0, 1)[None] for t in flat]
        torch.testing.assert_close(got[s:e], _sdpa(*part, None)[0])
    with pytest.raises(ValueError, match="together"):
        _attend(q, k, v, cu_seq_lens_q=cu)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_packed_rows_in_a_batch_match_sdpa(arch):
    """Position ids restarting inside several rows (and a jump, which sdpa also reads as a new
    sequence); a (1, len) row shared by the batch is one plain sequence per row."""
    ref, fast = models(arch)
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(7))
    position_ids = torch.tensor([list(range(5)) + list(range(7)),
                                 list(range(12)),
                                 [0, 1, 2, 5, 6, 7, 0, 1, 2, 3, 0, 1]])
    with torch.no_grad():
        for pos in (position_ids, torch.arange(12)[None]):
            # no cache: transformers reads packing from position ids only without one
            torch.testing.assert_close(fast(ids, position_ids=pos, use_cache=False).logits,
                                       ref(ids, position_ids=pos, use_cache=False).logits,
                                       rtol=1e-4, atol=1e-5)
        # the first row's two sequences, each alone
        alone = torch.cat([ref(ids[:1, :5]).logits, ref(ids[:1, 5:]).logits], 1)
        torch.testing.assert_close(fast(ids, position_ids=position_ids).logits[:1], alone,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["position_bias", "sinks", "indices"])
def test_attention_patterns_fasttrain_does_not_compute_are_refused(name):
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    with pytest.raises(NotImplementedError, match=name):
        _attend(q, k, v, **{name: torch.zeros(1, 2, 6, 6)})


def test_a_four_dimensional_mask_is_refused():
    q, k, v = (torch.randn(2, 2, 6, 16) for _ in range(3))
    from fasttrain.integrations.transformers import attention_forward

    with pytest.raises(ValueError, match="2-D padding mask"):
        attention_forward(_Attention(), q, k, v, torch.ones(2, 1, 6, 6, dtype=torch.bool))


def test_mask_overlays_and_chunked_attention_are_refused():
    from types import SimpleNamespace

    from fasttrain.integrations.transformers import padding_mask

    with pytest.raises(NotImplementedError, match="overlay"):
        padding_mask(2, 6, 6, mask_function=lambda b, h, q, kv: q >= kv, use_vmap=True,
                     config=SimpleNamespace())
    with pytest.raises(NotImplementedError, match="attention_chunk_size"):
        padding_mask(2, 6, 6, config=SimpleNamespace(attention_chunk_size=4))
    assert padding_mask(2, 4, 4, config=SimpleNamespace(attention_chunk_size=4)) is None
    no_chunked_layers = SimpleNamespace(attention_chunk_size=4, layer_types=["full_attention"])
    assert padding_mask(2, 6, 6, config=no_chunked_layers) is None
    # a bidirectional prefix (PaliGemma's block_sequence_ids): no use_vmap, found in the closures
    from transformers.masking_utils import (and_masks, blockwise_overlay, causal_mask_function,
                                            or_masks, sliding_window_overlay)

    blocks = torch.tensor([[0, 0, 0, -1, -1, -1]])
    prefix = or_masks(causal_mask_function, blockwise_overlay(blocks))
    with pytest.raises(NotImplementedError, match="bidirectional tokens"):
        padding_mask(1, 6, 6, mask_function=prefix, config=SimpleNamespace())
    # PaliGemma: non-causal modules (use_bidirectional_attention) under a causal + prefix mask
    with pytest.raises(NotImplementedError, match="causal over non-causal"):
        padding_mask(1, 6, 6, mask_function=prefix,
                     config=SimpleNamespace(use_bidirectional_attention=True))
    assert padding_mask(1, 6, 6, mask_function=causal_mask_function) is None
    # no token in a block (a multimodal model's text-only batch): nothing to refuse, also in a
    # sliding layer's and/or composition (use_vmap)
    text = blockwise_overlay(torch.full((1, 6), -1))
    sliding = and_masks(or_masks(causal_mask_function, text), sliding_window_overlay(4))
    assert padding_mask(1, 6, 6, mask_function=sliding, use_vmap=True,
                        config=SimpleNamespace()) is None
    custom = and_masks(or_masks(causal_mask_function, lambda b, h, q, kv: q < 2),
                       sliding_window_overlay(4))
    with pytest.raises(NotImplementedError, match="custom mask overlay"):
        padding_mask(1, 6, 6, mask_function=custom, use_vmap=True, config=SimpleNamespace())


def test_gemma3_multimodal_text_only_batches_with_token_type_ids_match_eager():
    """Gemma 3's processor always returns token_type_ids; with no image token the model's block
    overlays change nothing and are not refused."""
    text = transformers.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16,
                                         sliding_window=8)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                    mm_tokens_per_image=4, image_token_index=127)
    torch.manual_seed(0)
    built = [transformers.Gemma3ForConditionalGeneration._from_config(
        copy.deepcopy(cfg), attn_implementation=name).train() for name in ("eager", "fasttrain")]
    built[1].load_state_dict(built[0].state_dict())
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    expected, got = (model(**kwargs).logits for model in built)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-5)


def test_a_batch_without_padding_reads_no_shared_position_row(monkeypatch):
    """transformers passes (1, L) position ids to every batch: read, they would cost a host sync
    per forward for a batch that cannot be packed."""
    import fasttrain.integrations.transformers as integration

    ref, fast = models("llama")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(9))

    def no_read(*args):
        raise AssertionError("position ids read")

    monkeypatch.setattr(integration, "_packed_cu", no_read)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)


def test_gemma3_bidirectional_attention_matches_sdpa():
    """use_bidirectional_attention: an or-overlay making every layer two-sided (the sliding
    layers within the window), which the modules' is_causal=False carries."""
    cfg = transformers.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16,
                                        sliding_window=4, use_bidirectional_attention=True,
                                        layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    ref = transformers.Gemma3TextModel(copy.deepcopy(cfg)).eval()
    cfg._attn_implementation = "fasttrain"
    fast = transformers.Gemma3TextModel(cfg).eval()
    fast.load_state_dict(ref.state_dict())
    assert (ref.config._attn_implementation, fast.config._attn_implementation) == ("sdpa",
                                                                                   "fasttrain")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).last_hidden_state, ref(ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bidirectional", ["all", "vision"])
def test_gemma4_bidirectional_and_vision_text_models_match_sdpa(bidirectional):
    """Gemma 4 "all": non-causal modules under a two-sided sliding window the mask makes
    inclusive (|q - kv| <= sliding_window, one wider than transformers' FlashAttention path);
    "vision": causal modules (text-only here: no block overlay to refuse)."""
    cfg = transformers.Gemma4TextConfig(
        **SMALL, num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=4,
        vocab_size_per_layer_input=128, hidden_size_per_layer_input=16,
        layer_types=["sliding_attention", "full_attention"],
        use_bidirectional_attention=bidirectional)
    torch.manual_seed(0)
    ref, fast = (transformers.Gemma4TextModel._from_config(copy.deepcopy(cfg),
                                                           attn_implementation=name).eval()
                 for name in ("sdpa", "fasttrain"))
    fast.load_state_dict(ref.state_dict())
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).last_hidden_state, ref(ids).last_hidden_state,
                                   rtol=1e-4, atol=2e-5)
        got = fast(ids, attention_mask=mask).last_hidden_state
        expected = ref(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=2e-5)
