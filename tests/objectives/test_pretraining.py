"""PretrainingModule on a tiny real MVPTRModel: which parts run, which get gradients, the weighted sum."""
import dataclasses

import pytest
import torch

from mvptr_ds.config import MODEL_PRESETS, OBJECTIVES, ConfigError, ObjectiveConfig
from mvptr_ds.model.mvptr import MVPTRModel
from mvptr_ds.objectives import PretrainingModule, build_pretraining_module
from objective_fixtures import TINY, make_batch


def normal_batch():
    return make_batch([0, 1, 1, 2], [8, 7, 5, 6], [2, 1, 0, 2], [3, 1, 2, 4], seed=4)


def degenerate_batch():
    # One image for the whole batch, no phrase, no masked token, one region each.
    return make_batch([5, 5, 5], [6, 5, 6], [0, 0, 0], [1, 1, 1], mask_every=0, seed=5)


def test_stage1_has_no_cross_encoder_and_never_calls_it(monkeypatch):
    torch.manual_seed(0)
    module = build_pretraining_module(TINY, ["mcr"], ObjectiveConfig())
    assert module.backbone.cross_encoder is None and module.backbone.pooler is None
    assert set(module.heads) == {"mcr"}
    assert {k.split(".")[0] for k in module.state_dict()} == {"backbone", "heads"}
    assert all(k.startswith("heads.mcr.") for k in module.state_dict() if k.startswith("heads."))

    def forbidden(*args, **kwargs):
        raise AssertionError("stage 1 ran the cross-modal encoder")

    monkeypatch.setattr(module.backbone, "encode_cross", forbidden)
    out = module(normal_batch())
    assert set(out.losses) == {"mcr"} and torch.isfinite(out.loss)
    out.loss.backward()
    # Every parameter gets a gradient (ZeRO sees the same set each step); the text side's are exact zeros.
    assert all(p.grad is not None for p in module.parameters())
    text_side = list(module.backbone.text_encoder.parameters()) + [module.backbone.txt_proj.weight,
                                                                   module.backbone.vis_proj.weight,
                                                                   module.backbone.logit_scale]
    assert all(p.grad.abs().max() == 0 for p in text_side)
    assert module.heads["mcr"].decoder.weight.grad.abs().max() > 0


def test_mcr_leaves_cross_encoder_untouched():
    torch.manual_seed(0)
    module = PretrainingModule(MVPTRModel(TINY, with_cross=True), ["mcr"], ObjectiveConfig())
    module(normal_batch()).loss.backward()
    assert all(p.grad is None for p in module.backbone.cross_encoder.parameters())
    assert all(p.grad is None for p in module.backbone.pooler.parameters())
    assert all(p.grad.abs().max() == 0 for p in module.backbone.text_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.backbone.visual_encoder.parameters())


@pytest.mark.parametrize("make", [normal_batch, degenerate_batch, lambda: make_batch([3], [6], [1], [1], seed=6)],
                         ids=["normal", "one_image_no_phrase_no_mask", "batch_of_one"])
def test_stage2_all_objectives_every_parameter_gets_a_gradient(make):
    torch.manual_seed(0)
    module = build_pretraining_module(TINY, OBJECTIVES, ObjectiveConfig())
    assert set(module.heads) == {"mcr", "mlm", "itm"}
    out = module(make())
    assert set(out.losses) == set(OBJECTIVES)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_loss_is_the_weighted_sum():
    torch.manual_seed(0)
    cfg = ObjectiveConfig(weights=(("vsc", 2.0), ("wpg", 0.5)))
    module = build_pretraining_module(TINY, ["vsc", "wpg", "mlm"], cfg).eval()
    out = module(normal_batch())
    expected = 2.0 * out.losses["vsc"] + 0.5 * out.losses["wpg"] + out.losses["mlm"]
    assert torch.allclose(out.loss, expected)
    assert "vsc/t2v_acc" in out.metrics and "wpg/pairs" in out.metrics


def test_vsc_alone_builds_no_cross_encoder():
    module = build_pretraining_module(TINY, ["vsc"], ObjectiveConfig())
    assert module.backbone.cross_encoder is None and len(module.heads) == 0


def test_bad_objective_choices_raise():
    with pytest.raises(ConfigError, match="unknown"):
        build_pretraining_module(TINY, ["mcr", "itc"], ObjectiveConfig())
    with pytest.raises(ConfigError, match="cross-modal"):
        PretrainingModule(MVPTRModel(TINY, with_cross=False), ["mlm"], ObjectiveConfig())


def test_logit_scale_decays_only_in_the_release():
    from mvptr_ds.training.optim import decay_groups

    cfg = dataclasses.replace(MODEL_PRESETS["tiny"], vocab_size=50, only_word_size=40)
    module = build_pretraining_module(cfg, ("mcr", "vsc", "itm", "mlm", "wpg"), ObjectiveConfig())
    names = {id(p): n for n, p in module.named_parameters()}
    for release in (False, True):
        decayed, plain = ([names[id(p)] for p in g["params"]] for g in decay_groups(module, 0.01, release))
        assert ("backbone.logit_scale" in decayed) == release and ("backbone.logit_scale" in plain) != release
        assert all(n.endswith("bias") or "LayerNorm" in n or "layernorm" in n for n in plain
                   if n != "backbone.logit_scale")
        assert "backbone.txt_proj.weight" in decayed and "heads.mlm.bias" in plain


@pytest.mark.parametrize("reset", [False, True])
def test_init_from_keeps_or_resets_the_decoders(tmp_path, reset):
    """The release's from_pretrained clones the decoders from the word embeddings again (reset_decoders_on_init)."""
    from mvptr_ds.config import RunConfig
    from mvptr_ds.training.init_from import init_weights
    from mvptr_ds.training.weights import save_weights

    cfg = dataclasses.replace(MODEL_PRESETS["tiny"], vocab_size=50, only_word_size=40)
    source = build_pretraining_module(cfg, ("mcr",), ObjectiveConfig())
    with torch.no_grad():
        source.heads["mcr"].decoder.weight.add_(1.0)  # trained away from the embeddings
    save_weights(str(tmp_path / "ckpt"), source.state_dict(), RunConfig(model=cfg))
    target = build_pretraining_module(cfg, ("mcr",), ObjectiveConfig())
    lines = init_weights(target, str(tmp_path / "ckpt"), reset_decoders=reset)
    words = target.backbone.embeddings.word_embeddings.weight[:40]
    assert torch.equal(target.heads["mcr"].decoder.weight, words if reset else source.heads["mcr"].decoder.weight)
    assert any("decoders copied" in line for line in lines) == reset


@pytest.mark.parametrize("encoding", ["shared", "separate"])
@pytest.mark.parametrize("mode", ["sampled", "hardest"])
def test_wpg_scores_the_mined_negative(mode, encoding):
    """--wpg_negatives sampled|hardest: WPG's loss is the loss of the random mode on the batch whose negative
    pairs are the mined ones (the mining is the only change), and a batch of one image stays finite."""
    from mvptr_ds.objectives.wpg import mined_negative_pairs

    torch.manual_seed(0)
    mined_cfg = ObjectiveConfig(wpg_negatives=mode, wpg_negative_encoding=encoding)
    module = build_pretraining_module(TINY, ["vsc", "wpg"], mined_cfg).eval()
    batch = dataclasses.replace(normal_batch(), wpg_negative_draw=torch.tensor([0.1, 0.5, 0.9, 0.3]))
    out = module(batch)
    outputs = module.backbone(batch, run_cross=True)
    chosen = mined_negative_pairs(outputs, batch, mode)
    assert not torch.equal(chosen.wpg_negative_pair, batch.wpg_negative_pair)  # the case tests something
    module.objective_cfg = ObjectiveConfig(wpg_negative_encoding=encoding)    # random: the batch's own pairs
    assert torch.allclose(out.losses["wpg"], module(chosen).losses["wpg"])
    module.objective_cfg = mined_cfg
    lonely = dataclasses.replace(degenerate_batch(), wpg_negative_draw=torch.full((3,), 0.5))
    assert torch.isfinite(module(lonely).loss)


def test_wpg_negatives_option_is_checked():
    with pytest.raises(ConfigError, match="wpg_negatives='easy'"):
        ObjectiveConfig(wpg_negatives="easy").validate()
