"""MVPTR backbone and heads: shapes, layout, padding-aware cross-modal compute, seams, init, size."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import mvptr_ds.kernels as kernels
from mvptr_ds.config import MODEL_PRESETS, ConfigError
from mvptr_ds.data.types import Batch
from mvptr_ds.model import EncoderOutputs, ITMHead, MaskedTokenHead, MVPTRModel

TINY = replace(MODEL_PRESETS["tiny"], hidden_size=32, num_attention_heads=4, intermediate_size=64,
               vocab_size=150, only_word_size=100, max_position_embeddings=32, img_feature_dim=14,
               hidden_dropout=0.0, attention_dropout=0.0, kernels="torch")


def make_batch(text_lens=(6, 4, 3), tag_lens=(4, 3, 5), region_lens=(2, 5, 1), seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    b, lt, lg, lr = len(text_lens), max(text_lens), max(tag_lens), max(region_lens)
    ar = torch.arange

    def mask(lens, width):
        return ar(width)[None, :] < torch.tensor(lens)[:, None]

    text_mask, tag_mask, region_mask = mask(text_lens, lt), mask(tag_lens, lg), mask(region_lens, lr)
    text_ids = torch.randint(1, TINY.vocab_size, (b, lt), generator=g) * text_mask
    tag_ids = torch.randint(1, TINY.only_word_size, (b, lg), generator=g) * tag_mask
    feats = torch.randn(b, lr, TINY.img_feature_dim, generator=g) * region_mask[..., None]
    neg1 = torch.full((b, lt), -1)
    return Batch(text_ids=text_ids, text_mask=text_mask, phrase_mask=torch.zeros_like(text_mask),
                 tag_ids=tag_ids, tag_mask=tag_mask, region_feats=feats, region_mask=region_mask,
                 image_ids=ar(b), sample_ids=ar(b), mlm_labels=neg1, mcr_labels=torch.full((b, lg), -1),
                 wpg_negative_pair=torch.full((b,), -1), wpg_pick_positive=torch.zeros(b, lt),
                 wpg_pick_negative=torch.zeros(b, lt), itm_text_side=ar(b) < (b + 1) // 2,
                 itm_negative_draw=torch.zeros(b, 2))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MVPTRModel(TINY).eval()


def test_needs_vocab_sizes():
    with pytest.raises(ConfigError, match="vocab_size"):
        MVPTRModel(MODEL_PRESETS["tiny"])


def test_forward_shapes_and_normalised_embeddings(model):
    batch = make_batch()
    out = model(batch)
    assert isinstance(out, EncoderOutputs)
    b, lt, lg, lr, h = 3, 6, 5, 5, TINY.hidden_size
    assert out.text.shape == (b, lt, h) and out.visual.shape == (b, lg + lr, h)
    assert out.cross.shape == (b, lt + lr, h) and out.pooled.shape == (b, h)
    assert out.num_tags == lg
    assert torch.allclose(out.text_embed.norm(dim=-1), torch.ones(b), atol=1e-6)
    assert torch.allclose(out.visual_embed.norm(dim=-1), torch.ones(b), atol=1e-6)
    assert torch.allclose(out.text_embed, F.normalize(out.text[:, 0] @ model.txt_proj.weight.T, dim=-1))
    assert torch.allclose(out.pooled, torch.tanh(model.pooler.dense(out.cross[:, 0])))
    assert model(batch, run_cross=False).cross is None


def test_stage1_model_has_no_cross_encoder():
    m = MVPTRModel(TINY, with_cross=False)
    assert not any(k.startswith(("cross_encoder", "pooler")) for k in m.state_dict())
    out = m(make_batch())
    assert out.cross is None and out.pooled is None
    with pytest.raises(ConfigError, match="with_cross=False"):
        m.encode_cross(out.text, torch.ones(3, 6, dtype=torch.bool), out.visual[:, 5:],
                       torch.ones(3, 5, dtype=torch.bool))


def test_embedding_layout(model):
    """Text: type 0, positions 0..Lt-1; tags: type 1, positions restart at 0; regions: no position/type."""
    batch = make_batch()
    e = model.embeddings
    ids = batch.tag_ids
    pos = torch.arange(ids.shape[1])
    manual = F.layer_norm(e.word_embeddings(ids) + e.position_embeddings(pos) + e.token_type_embeddings.weight[1],
                          (TINY.hidden_size,), e.LayerNorm.weight, e.LayerNorm.bias, TINY.layer_norm_eps)
    assert torch.allclose(e(ids, 1), manual, atol=1e-6)
    # Permuting regions permutes the visual encoder's region outputs: no position embedding on regions.
    full = make_batch(region_lens=(4, 4, 4))
    perm = torch.tensor([2, 0, 3, 1])
    a = model.encode_visual(full.tag_ids, full.tag_mask, full.region_feats, full.region_mask)
    p = model.encode_visual(full.tag_ids, full.tag_mask, full.region_feats[:, perm], full.region_mask)
    lg = full.tag_ids.shape[1]
    assert torch.allclose(a[:, lg:][:, perm], p[:, lg:], atol=1e-5)
    assert torch.allclose(a[:, :lg], p[:, :lg], atol=1e-5)


def naive_cross(model, text_h, text_mask, region_h, region_mask):
    joint = torch.cat([text_h, region_h], 1)
    return model.cross_encoder(joint, torch.cat([text_mask, region_mask], 1))


def test_packed_cross_equals_padded_computation(model):
    torch.manual_seed(1)
    batch = make_batch(text_lens=(7, 3, 5, 2), tag_lens=(3, 3, 3, 3), region_lens=(1, 6, 2, 3))
    text_h = torch.randn(4, 7, TINY.hidden_size, requires_grad=True)
    region_h = torch.randn(4, 6, TINY.hidden_size, requires_grad=True)
    valid = torch.cat([batch.text_mask, batch.region_mask], 1)
    packed = model.encode_cross(text_h, batch.text_mask, region_h, batch.region_mask)
    naive = naive_cross(model, text_h, batch.text_mask, region_h, batch.region_mask)
    assert packed.shape == naive.shape == (4, 13, TINY.hidden_size)
    assert (packed[valid] - naive[valid]).abs().max() < 1e-5
    assert torch.all(packed[~valid] == 0)
    # Gradients through the packed path equal those of the naive one.
    w = torch.randn_like(packed) * valid[..., None]
    g_packed = torch.autograd.grad((packed * w).sum(), (text_h, region_h))
    g_naive = torch.autograd.grad((naive * w).sum(), (text_h, region_h))
    for a, b in zip(g_packed, g_naive):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("skip_padding, checkpointing", [(True, False), (False, False), (True, True)])
def test_pooled_cross_equals_pooling_the_whole_encoding(skip_padding, checkpointing):
    """ITM's negatives and the evaluation's re-ranking read the pooler only: the last cross-modal layer then
    runs at position 0 alone (every position still gives keys and values). Same values and gradients."""
    torch.manual_seed(2)
    m = MVPTRModel(replace(TINY, skip_padding=skip_padding, activation_checkpointing=checkpointing)).train()
    batch = make_batch(text_lens=(7, 3, 5, 2), tag_lens=(3, 3, 3, 3), region_lens=(1, 6, 2, 3))
    text_h = torch.randn(4, 7, TINY.hidden_size, requires_grad=True)
    region_h = torch.randn(4, 6, TINY.hidden_size, requires_grad=True)
    args = (text_h, batch.text_mask, region_h, batch.region_mask)
    seen = []
    hook = m.cross_encoder.layer[-1].intermediate.dense.register_forward_hook(
        lambda mod, inp, out: seen.append(inp[0].shape[0]))
    fast = m.pooled_cross(*args)
    hook.remove()
    # The last layer's feed-forward ran on the 4 first positions only; the authors' way runs it everywhere.
    assert seen == ([4] if skip_padding else [4 * 13])
    full = m.pool(m.encode_cross(*args))
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(fast)
    params = [text_h, region_h] + list(m.cross_encoder.parameters()) + list(m.pooler.parameters())
    g_fast = torch.autograd.grad((fast * w).sum(), params, allow_unused=True)
    g_full = torch.autograd.grad((full * w).sum(), params, allow_unused=True)
    for a, b in zip(g_fast, g_full):
        assert (a is None and (b is None or not b.any())) or torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    bad = batch.text_mask.clone()
    bad[1, 0] = False
    with pytest.raises(ValueError, match="position 0"):
        m.pooled_cross(text_h, bad, region_h, batch.region_mask)


def test_packed_cross_trims_the_sequence(model, monkeypatch):
    """The encoder sees max_i(text_i + regions_i) positions, not Lt + Lr; also with a gap in a mask."""
    seen = []
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda q, *a, **k: seen.append(q.shape[2]) or real(q, *a, **k))
    batch = make_batch(text_lens=(7, 2), tag_lens=(3, 3), region_lens=(1, 6))
    text_mask = batch.text_mask.clone()
    text_mask[0, 3] = False  # a hole: still handled (real positions keep their order)
    text_h = torch.randn(2, 7, TINY.hidden_size)
    region_h = torch.randn(2, 6, TINY.hidden_size)
    packed = model.encode_cross(text_h, text_mask, region_h, batch.region_mask)
    assert set(seen) == {8}  # max(6 + 1, 2 + 6), not 13
    naive = naive_cross(model, text_h, text_mask, region_h, batch.region_mask)
    valid = torch.cat([text_mask, batch.region_mask], 1)
    assert (packed[valid] - naive[valid]).abs().max() < 1e-5


def test_dense_layers_run_on_real_tokens_only(model):
    """Position-wise work sees N = real tokens rows; padded outputs are zeros."""
    rows = []
    hook = model.text_encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda mod, inp, out: rows.append(inp[0].shape[0]))
    batch = make_batch(text_lens=(6, 4, 3))
    try:
        out = model.encode_text(batch.text_ids, batch.text_mask)
    finally:
        hook.remove()
    assert rows == [13]  # 6 + 4 + 3, not 3 * 6
    assert torch.all(out[~batch.text_mask] == 0) and torch.all(out[batch.text_mask].abs().sum(-1) > 0)


def test_kernel_seams_are_used(model, monkeypatch):
    calls = {"attention": 0, "concept_embedding": 0}
    for name in calls:
        real = getattr(kernels, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(kernels, name, wrapped)
    model(make_batch())
    assert calls["concept_embedding"] == 1  # text and tag streams in one lookup
    assert calls["attention"] == TINY.text_layers + TINY.visual_layers + TINY.cross_layers


def test_one_lookup_for_words_and_tags_equals_two(model):
    """One call of BertEmbeddings for two streams gives each stream what its own lookup gives (positions from 0 in each, their
    types), and the word table's gradient is the sum of both streams'."""
    batch = make_batch()
    emb = model.embeddings  # eval mode: no dropout
    types = torch.randint(0, 2, batch.text_ids.shape)
    words, tags = emb(batch.text_ids, types, batch.tag_ids, 1)
    assert torch.equal(words, emb(batch.text_ids, types)) and torch.equal(tags, emb(batch.tag_ids, 1))
    grads = []
    for separate in (False, True):
        emb.zero_grad()
        a, b = ((emb(batch.text_ids, 0), emb(batch.tag_ids, 1)) if separate else
                emb(batch.text_ids, 0, batch.tag_ids, 1))
        (a.square().sum() + b.sum()).backward()
        grads.append(emb.word_embeddings.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = MVPTRModel(TINY).train()
    ckpt = MVPTRModel(replace(TINY, activation_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    batch = make_batch()
    grads = []
    for m in (plain, ckpt):
        out = m(batch)
        (out.cross.square().sum() + out.text_embed.sum()).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5), k


def test_bert_style_init():
    torch.manual_seed(0)
    m = MVPTRModel(replace(TINY, hidden_size=64, intermediate_size=128))
    assert m.logit_scale.shape == (1,) and math.isclose(m.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    for name, p in m.named_parameters():
        if "LayerNorm" in name or "layernorm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        elif p.dim() == 2:
            assert abs(p.std().item() - TINY.initializer_range) < 0.005, name


def test_img_layernorm_is_optional_and_on_by_default():
    """On by default; off in the release's pre-training (run_pretrain_ml.py --use_img_layernorm 0, --recipe
    release), where the model has no such parameters."""
    assert MVPTRModel(TINY).img_layernorm is not None
    assert MVPTRModel(replace(TINY, use_img_layernorm=False)).img_layernorm is None


def test_heads():
    torch.manual_seed(0)
    h = torch.randn(2, 5, TINY.hidden_size)
    mlm = MaskedTokenHead(TINY)
    assert mlm(h).shape == (2, 5, TINY.only_word_size)
    manual = mlm.decoder(mlm.transform.LayerNorm(F.gelu(mlm.transform.dense(h)))) + mlm.bias
    assert torch.allclose(mlm(h), manual)
    assert mlm.decoder.bias is None
    assert ITMHead(TINY)(h[:, 0]).shape == (2, 2)
    with pytest.raises(ConfigError, match="only_word_size"):
        MaskedTokenHead(MODEL_PRESETS["tiny"])


def _expected_base_counts(vocab, words):
    """Parameters of the base backbone and heads, from MVPTR.md section 1."""
    H, I, P, T, F_, layers = 768, 3072, 512, 2, 2054, 18
    linear = lambda i, o: i * o + o  # noqa: E731
    layer = 4 * linear(H, H) + linear(H, I) + linear(I, H) + 2 * 2 * H
    embeddings = (vocab + P + T) * H + 2 * H
    regions = linear(F_, H) + 2 * H          # img_embedding + its LayerNorm
    backbone = embeddings + layers * layer + regions + linear(H, H) + 2 * H * H + 1  # pooler, projections, scale
    masked_token_head = linear(H, H) + 2 * H + words * H + words
    return backbone, 2 * masked_token_head, linear(H, 2)


def test_base_parameter_count():
    # The authors' checkpoint key list holds the region LayerNorm (MVPTR.md section 6): counted with it.
    cfg = replace(MODEL_PRESETS["base"], vocab_size=86051, only_word_size=30522, use_img_layernorm=True)
    with torch.device("meta"):
        backbone = MVPTRModel(cfg)
        heads = [MaskedTokenHead(cfg), MaskedTokenHead(cfg), ITMHead(cfg)]
    n_backbone = sum(p.numel() for p in backbone.parameters())
    n_heads = sum(p.numel() for h in heads[:2] for p in h.parameters())
    n_itm = sum(p.numel() for p in heads[2].parameters())
    assert (n_backbone, n_heads, n_itm) == _expected_base_counts(86051, 30522)
    assert n_backbone == 197_415_169                 # "about 197M"
    assert round((n_backbone + n_heads) / 1e6, 1) == 245.5  # "245.5M with the pre-training heads"
