"""fusedattn.integrations.transformers against transformers' own sdpa attention.

Tiny randomly initialised models built from configs (no download: HF_HUB_OFFLINE=1). The
initialisation is scaled up (initializer_range 0.5) so attention changes the logits well above
float32 rounding: a wrong mask shows (``test_padding_matters`` checks that it would).
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(optional extra: pip install 'fusedattn[transformers]')")

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from fusedattn.integrations import transformers as fa_hf  # noqa: E402

NAME = fa_hf.register()
V = 96


def _config(family: str, **kw):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.5, pad_token_id=0, attention_dropout=0.0)
    if family == "llama":
        return transformers.LlamaConfig(**{**common, **kw})
    if family == "qwen2":
        return transformers.Qwen2Config(**{**common, **kw})
    if family == "mistral":
        return transformers.MistralConfig(**{**common, "sliding_window": 4, **kw})
    raise ValueError(family)


def _models(cfg, cls=transformers.AutoModelForCausalLM):
    """(sdpa float32, fusedattn float32, sdpa float64 = the truth), same weights, eval mode."""
    torch.manual_seed(0)
    make = getattr(cls, "from_config", None) or cls._from_config
    # each model gets its own config: from_config records attn_implementation in the config object
    ref = make(copy.deepcopy(cfg), attn_implementation="sdpa")
    ours = make(copy.deepcopy(cfg), attn_implementation=NAME)
    truth = make(copy.deepcopy(cfg), attn_implementation="sdpa").double()
    ours.load_state_dict(ref.state_dict())
    truth.load_state_dict(ref.state_dict())
    assert (ref.config._attn_implementation, ours.config._attn_implementation) == ("sdpa", NAME)
    return ref.eval(), ours.eval(), truth.eval()


def _pair(cfg, cls=transformers.AutoModelForCausalLM):
    ref, ours, _ = _models(cfg, cls)
    return ref, ours


def _as_close_as_sdpa(ours, sdpa, truth, what=""):
    """The project's rule: our float32 error against the float64 truth is at most twice SDPA's
    float32 error, plus a floor of 1e-6 of the magnitude."""
    err = (ours.double() - truth).abs().max()
    base = (sdpa.double() - truth).abs().max()
    assert err <= 2 * base + 1e-6 * truth.abs().max(), (what, float(err), float(base))


def _ids(B=3, L=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (B, L), generator=g)


PADDING = {
    "none": None,
    "right": torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7]),
    "left": torch.tensor([[1] * 9, [0] * 4 + [1] * 5, [0] * 8 + [1]]),
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("padding", list(PADDING))
def test_logits_match_sdpa(family, padding):
    ref, ours, truth = _models(_config(family))
    ids, mask = _ids(), PADDING[padding]
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", fa_hf.SdpaFallbackWarning)
        a, b = ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
        t = truth(ids, attention_mask=mask).logits
    _as_close_as_sdpa(b[valid], a[valid], t[valid])


def test_padding_matters():
    """The comparison above can fail: ignoring the padding changes the logits of valid tokens."""
    _, ours = _pair(_config("llama"))
    ids, mask = _ids(), PADDING["left"]
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, ours(ids).logits
    assert (a - b)[1, 4:].abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_loss_gradients_match_sdpa(family):
    models = _models(_config(family))
    ids, mask = _ids(), PADDING["right"]
    labels = ids.masked_fill(mask == 0, -100)
    for m in models:
        m.train()
        m(ids, attention_mask=mask, labels=labels).loss.backward()
    ref, ours, truth = models
    for (name, p), q, t in zip(ref.named_parameters(), ours.parameters(), truth.parameters()):
        _as_close_as_sdpa(q.grad, p.grad, t.grad, name)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_greedy_generation_matches_sdpa(cache, family):
    ref, ours, truth = _models(_config(family))
    ids, mask = _ids(), PADDING["left"]
    kw = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with warnings.catch_warnings():
        warnings.simplefilter("error", fa_hf.SdpaFallbackWarning)
        a, b = ref.generate(ids, **kw), ours.generate(ids, **kw)
        t = truth.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences, t.sequences)
    for step, (la, lb, lt) in enumerate(zip(a.logits, b.logits, t.logits)):
        _as_close_as_sdpa(lb, la, lt, f"step {step}")


def test_static_cache_prefill_without_mask_is_top_left():
    """The trap: with a StaticCache the prefill passes mask=None, Lq=6 queries against Lk=8 slots."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    ours, _ = fa_hf.attention_forward(module, q, k, v, None, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    torch.testing.assert_close(ours, ref)
    bottom_right = fa_hf.api.dot_product_attention(q, k, v, scale=0.3, causal=True).transpose(1, 2)
    assert (bottom_right - ref).abs().max() > 1e-2      # passing causal=True through would be wrong


def _random_mask(kind: str, g: torch.Generator, B=3, Lq=7, Lk=10):
    """Masks as transformers builds them: padding (left / right / holes) + causal / sliding window."""
    past = Lk - Lq
    i = torch.arange(Lq).view(-1, 1) + past
    j = torch.arange(Lk).view(1, -1)
    padding, _, pattern = kind.partition("-")
    pad = torch.ones(B, Lk, dtype=torch.bool)
    for b in range(B):
        n = int(torch.randint(0, Lk, (1,), generator=g))
        if padding == "left":
            pad[b, :n] = False
        elif padding == "right":
            pad[b, Lk - n:] = False
        elif padding == "holes":    # right-padded prompts, then generated tokens: holes in the cache only
            pad[b, :past] = torch.rand(past, generator=g) > 0.3
        else:                       # anywhere, also at the queries' own positions: may not be expressible
            pad[b] = torch.rand(Lk, generator=g) > 0.3
    sw = int(torch.randint(1, Lk, (1,), generator=g))
    causal = j <= i
    full = torch.ones(Lq, Lk, dtype=torch.bool)
    patterns = {"causal": causal, "sliding": causal & (j > i - sw), "full": full,
                "random": torch.rand(Lq, Lk, generator=g) > 0.5}
    return pad[:, None, None, :] & patterns[pattern or "causal"]


# holes inside a sliding window change the window's width in packed keys from row to row:
# fused only when they happen not to, else the fallback
EXACT = ["left", "right", "holes", "left-sliding", "right-sliding", "left-full", "holes-full"]


@pytest.mark.parametrize("kind", [*EXACT, "holes-sliding", "anywhere", "anywhere-sliding", "holes-random"])
def test_any_mask_matches_sdpa_or_falls_back(kind, monkeypatch):
    """Every mask gives SDPA's result: through a fused plan, or through the (warned) fallback."""
    monkeypatch.setattr(fa_hf, "_WARNED", set())
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    g = torch.Generator().manual_seed(sum(map(ord, kind)))
    for _ in range(8):
        mask = _random_mask(kind, g)
        q, k, v = (torch.randn(3, h, L, 8, generator=g) for h, L in ((4, 7), (2, 10), (2, 10)))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            ours, _ = fa_hf.attention_forward(module, q, k, v, mask, scaling=0.5)
        ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.5)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        fell_back = any(issubclass(w.category, fa_hf.SdpaFallbackWarning) for w in rec)
        if kind in EXACT:
            assert not fell_back, [str(w.message) for w in rec]


def test_float_mask_and_bias_mask():
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    boolean = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5)
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~boolean, torch.finfo(torch.float32).min)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fa_hf.SdpaFallbackWarning)
        ours, _ = fa_hf.attention_forward(module, q, k, v, additive)
    torch.testing.assert_close(ours, sdpa_attention_forward(module, q, k, v, boolean)[0])
    biased = additive + torch.randn(2, 1, 5, 5) * boolean
    with pytest.warns(fa_hf.SdpaFallbackWarning, match="additive bias"):
        ours, _ = fa_hf.attention_forward(module, q, k, v, biased)
    torch.testing.assert_close(ours, sdpa_attention_forward(module, q, k, v, biased)[0])


def test_dropout_in_training_falls_back_once(monkeypatch):
    monkeypatch.setattr(fa_hf, "_WARNED", set())
    ref, ours = _pair(_config("llama", attention_dropout=0.3))
    ids = _ids()
    ref.train(), ours.train()
    torch.manual_seed(5)
    a = ref(ids).logits
    torch.manual_seed(5)
    with pytest.warns(fa_hf.SdpaFallbackWarning, match="dropout 0.3") as rec:
        b = ours(ids).logits
    assert len([w for w in rec if issubclass(w.category, fa_hf.SdpaFallbackWarning)]) == 1
    torch.testing.assert_close(a, b)


def test_output_attentions_is_refused():
    _, ours = _pair(_config("llama"))
    with pytest.raises(ValueError, match="output_attentions=True cannot be served"):
        ours(_ids(), output_attentions=True)


def test_position_bias_must_be_toeplitz(monkeypatch):
    monkeypatch.setattr(fa_hf, "_WARNED", set())
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = False, 1
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    t = torch.randn(2, 9)
    idx = torch.arange(6) - torch.arange(4).view(-1, 1) + 3
    toeplitz = t[:, idx].unsqueeze(0).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fa_hf.SdpaFallbackWarning)
        ours, _ = fa_hf.attention_forward(module, q, k, v, None, scaling=1.0, position_bias=toeplitz)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, scaling=1.0, position_bias=toeplitz)
    torch.testing.assert_close(ours, ref)
    g_ours, = torch.autograd.grad(ours.square().sum(), toeplitz)
    g_ref, = torch.autograd.grad(ref.square().sum(), toeplitz)
    # gradients reach the bias (summed per diagonal: the same for any parametrisation by j - i)
    sums = lambda g: torch.stack([g[0][:, idx == d].sum(-1) for d in range(9)], -1)  # noqa: E731
    torch.testing.assert_close(sums(g_ours), sums(g_ref))
    with pytest.warns(fa_hf.SdpaFallbackWarning, match="not Toeplitz"):
        fa_hf.attention_forward(module, q, k, v, None, scaling=1.0, position_bias=torch.randn(1, 2, 4, 6))


def _t5_models():
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                decoder_start_token_id=0, pad_token_id=0, initializer_factor=1.0,
                                dropout_rate=0.0)
    return _models(cfg, transformers.T5ForConditionalGeneration)


def test_t5_logits_gradients_and_generation():
    models = _t5_models()
    ids, mask = _ids(2, 11), torch.tensor([[1] * 11, [1] * 7 + [0] * 4])
    labels = _ids(2, 6, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fa_hf.SdpaFallbackWarning)
        la, lb, lt = (m(input_ids=ids, attention_mask=mask, labels=labels) for m in models)
        _as_close_as_sdpa(lb.logits, la.logits, lt.logits, "logits")
        for out in (la, lb, lt):
            out.loss.backward()
        ref, ours, truth = models
        for (name, p), q, t in zip(ref.named_parameters(), ours.parameters(), truth.parameters()):
            if p.grad is not None:
                _as_close_as_sdpa(q.grad, p.grad, t.grad, name)
        rel = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert dict(ours.named_parameters())[rel].grad.abs().max() > 0
        ga, gb = (m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
                  for m in (ref, ours))
    assert torch.equal(ga, gb)


def test_register_validates_backend():
    with pytest.raises(ValueError, match="backend='gpu' is unknown"):
        fa_hf.register("x", backend="gpu")


def test_gemma2_softcap_and_alternating_sliding_window():
    """Gemma 2: logit softcapping (which sdpa refuses) and sliding/full layers; against eager."""
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=64, initializer_range=0.5, pad_token_id=0,
                                    sliding_window=4, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=None)
    torch.manual_seed(0)
    make = transformers.AutoModelForCausalLM.from_config
    eager, ours, truth = (make(copy.deepcopy(cfg), attn_implementation=impl).eval()
                          for impl in ("eager", NAME, "eager"))
    truth.double()
    for m in (ours, truth):
        m.load_state_dict(eager.state_dict())
    ids, mask = _ids(), PADDING["left"]
    valid = mask.bool()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", fa_hf.SdpaFallbackWarning)
        a, b, t = (m(ids).logits for m in (eager, ours, truth))
        _as_close_as_sdpa(b, a, t)
        # padded: eager Gemma 2 in float64 gives NaN rows with padding (transformers 5.24), so
        # compare with float32 eager directly
        a, b = (m(ids, attention_mask=mask).logits for m in (eager, ours))
    assert (a - b)[valid].abs().max() <= 1e-5 * a[valid].abs().max()


def test_malformed_arguments_are_refused_by_name():
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = False, 1
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    f = fa_hf.attention_forward
    with pytest.raises(ValueError, match="query must have shape"):
        f(module, q[0], k, v, None)
    with pytest.raises(TypeError, match="key must be a torch.Tensor"):
        f(module, q, k.tolist(), v, None)
    with pytest.raises(TypeError, match="attention_mask must be None or a torch.Tensor"):
        f(module, q, k, v, [[True]])
    with pytest.raises(TypeError, match="position_bias must be None or a torch.Tensor"):
        f(module, q, k, v, None, position_bias=[[0.0]])
    for bad in ("0.1", -0.1, 1.5):
        with pytest.raises(ValueError, match="dropout must be a probability"):
            f(module, q, k, v, None, dropout=bad)
    with pytest.raises(TypeError, match="is_causal must be None or a bool"):
        f(module, q, k, v, None, is_causal="no")
    # what SDPA itself would refuse is refused here, by name, not handed to SDPA
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 1, 5, 6\) does not broadcast"):
        f(module, q, k, v, torch.ones(2, 1, 5, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask must be a bool or floating tensor"):
        f(module, q, k, v, torch.ones(2, 1, 5, 5, dtype=torch.int64))
    # a Toeplitz bias built for another (Lq, Lk): SDPA refuses it, so do we (it was read as a rel_bias)
    d = torch.arange(12)[None, :] - torch.arange(9)[:, None]
    with pytest.raises(ValueError, match=r"position_bias of shape \(1, 4, 9, 12\) does not broadcast"):
        f(module, q, k, v, None, position_bias=(0.3 * d.float()).expand(1, 4, 9, 12))


def test_broadcast_masks_run_fused_like_sdpa():
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = False, 1
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    pad = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    pad4 = pad[:, None, None, :]
    masks = (pad4, pad4.expand(2, 4, 1, 7), torch.ones(5, 7, dtype=torch.bool))
    for mask in masks:
        with warnings.catch_warnings():
            warnings.simplefilter("error", fa_hf.SdpaFallbackWarning)
            ours, _ = fa_hf.attention_forward(module, q, k, v, mask)
        torch.testing.assert_close(ours, sdpa_attention_forward(module, q, k, v, mask)[0])


_PACK = [5, 9, 3, 8]


def _packed_and_padded(seed=4):
    """The same sequences as a padding-free packed batch (flash attention's kwargs) and right-padded."""
    ids = _ids(B=len(_PACK), L=max(_PACK), seed=seed)
    seqs = [ids[b, :n].tolist() for b, n in enumerate(_PACK)]
    col = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)
    packed = col([{"input_ids": s} for s in seqs])
    mask = torch.tensor([[1] * n + [0] * (max(_PACK) - n) for n in _PACK])
    padded = dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask,
                  labels=ids.masked_fill(mask == 0, -100))
    return packed, padded, mask.bool()


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_padding_free_packing_matches_padded_sdpa(family):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) hands the attention function no mask
    and cu_seq_lens_q/k (what flash attention takes): each packed sequence attends to itself only
    (mistral: with its sliding window of 4), logits and loss gradients as SDPA on the padded batch."""
    models = _models(_config(family))
    packed, padded, valid = _packed_and_padded()
    ref, ours, truth = models
    for m in models:
        m.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fa_hf.SdpaFallbackWarning)
        out_ours = ours(**packed)
        out_ours.loss.backward()
    out_ref, out_truth = ref(**padded), truth(**padded)
    out_ref.loss.backward()
    out_truth.loss.backward()
    _as_close_as_sdpa(out_ours.logits[0], out_ref.logits[valid], out_truth.logits[valid], "logits")
    for (name, p), q, t in zip(ref.named_parameters(), ours.parameters(), truth.parameters()):
        _as_close_as_sdpa(q.grad, p.grad, t.grad, name)
    # and the packing matters: the same packed ids without the kwargs run as one sequence
    with torch.no_grad():
        one = ours(input_ids=packed["input_ids"]).logits[0]
    assert (one - out_ours.logits[0].detach()).abs().max() > 1e-2


def test_packed_kwargs_that_are_not_a_packed_batch_are_refused():
    _, ours = _pair(_config("llama"))
    packed, _, _ = _packed_and_padded()
    bad = dict(packed, cu_seq_lens_k=packed["cu_seq_lens_k"] + 1)
    with pytest.raises(ValueError, match="cu_seq_lens_k"), torch.no_grad():
        ours(**bad)
    ids2 = torch.cat([packed["input_ids"]] * 2)
    with pytest.raises(ValueError, match="packed batch"), torch.no_grad():
        ours(input_ids=ids2, position_ids=torch.cat([packed["position_ids"]] * 2),
             cu_seq_lens_q=packed["cu_seq_lens_q"], cu_seq_lens_k=packed["cu_seq_lens_k"])


def test_packed_kwargs_without_a_mask_take_the_sliding_window_per_sequence():
    """No mask, cu_seq_lens_q/k and sliding_window (flash attention's call): each sequence alone with
    keys i - sliding_window < j <= i, as a dense call per sequence with window (sliding_window - 1, 0)."""
    import fusedattn

    g = torch.Generator().manual_seed(5)
    lens = [6, 1, 11]
    q, k, v = (torch.randn(1, 4, sum(lens), 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 6, 7, 18], dtype=torch.int32)
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = fa_hf.attention_forward(module, q, k, v, None, scaling=0.3, sliding_window=3, cu_seq_lens_q=cu,
                                     cu_seq_lens_k=cu)
    assert out.shape == (1, sum(lens), 4, 8)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sl = [t[:, :, a:b] for t in (q, k, v)]
        want = fusedattn.dot_product_attention(*sl, scale=0.3, window=(2, 0), backend="reference")
        torch.testing.assert_close(out[0, a:b], want[0].transpose(0, 1), rtol=1e-5, atol=1e-6)
