"""The authors' checkpoint format: fixture outputs, key report, round trip, file conversion."""
import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mvptr_ds.compat import (authors_config_from, authors_to_project, convert_original, original_outputs,
                             project_to_authors)
from mvptr_ds.compat.authors_ckpt import split_state
from mvptr_ds.config import MODEL_PRESETS, ConfigError
from mvptr_ds.model import ITMHead, MaskedTokenHead, MVPTRModel
from mvptr_ds.training.weights import load_weights

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
FIXTURE = DATA / "fixtures" / "mvptr_original_tiny.pt"
KEYS = DATA / "original_checkpoint_keys.txt"
TINY = replace(MODEL_PRESETS["tiny"], hidden_size=32, num_attention_heads=4, intermediate_size=64,
               vocab_size=150, only_word_size=100, max_position_embeddings=32, kernels="torch")


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.is_file():
        pytest.skip(f"{FIXTURE} not available")
    return torch.load(FIXTURE, weights_only=False)  # our own trusted fixture


def valid_masks(inputs):
    text = inputs["attention_mask_a"].bool()
    visual = inputs["attention_mask_b"].bool()
    lg = inputs["input_ids_b"].shape[1]
    return {"text_encoder": text, "visual_encoder": visual, "mlm_logits": text, "mcr_logits": visual[:, :lg],
            "cross_encoder": torch.cat([text, visual[:, lg:]], 1)}


def test_fixture_layout_is_what_we_assume(fixture):
    """image_index gives each row's regions in the cross-modal sequence: right after the Lt text positions."""
    inputs = fixture["inputs"]
    lt, lg = inputs["input_ids_a"].shape[1], inputs["input_ids_b"].shape[1]
    n_regions = inputs["attention_mask_b"][:, lg:].sum(1)
    assert torch.all(inputs["image_index"][:, 0] == lt)
    assert torch.all(inputs["image_index"][:, 1] - lt == n_regions)
    assert fixture["outputs"]["cross_encoder"].shape[1] == lt + inputs["img_feats"].shape[1]


def test_original_outputs_match_fixture(fixture):
    ours = original_outputs(fixture, fixture["inputs"])
    theirs = fixture["outputs"]
    assert set(ours) == set(theirs) == {"text_encoder", "visual_encoder", "cross_encoder", "pooled",
                                        "similarity", "mlm_logits", "mcr_logits", "itm_logits"}
    masks = valid_masks(fixture["inputs"])
    for name, ref in theirs.items():
        got = ours[name]
        assert got.shape == ref.shape, name
        if name in masks:
            got, ref = got[masks[name]], ref[masks[name]]
        err = (got - ref).abs().max().item()
        assert err < 1e-5, f"{name}: max abs error {err:.2e}"


def test_fixture_discriminates_conventions(fixture):
    """The checks above can fail: the other projection orientation and the unswapped ITM rows are far off."""
    state, cfg, _ = authors_to_project(fixture["state_dict"], fixture["config"])
    backbone, _ = split_state(state)
    model = MVPTRModel(cfg).eval()
    model.load_state_dict(backbone)
    ours = original_outputs(fixture, fixture["inputs"])
    with torch.no_grad():
        t = F.normalize(ours["text_encoder"][:, 0] @ model.txt_proj.weight, dim=-1)   # the wrong orientation
        v = F.normalize(ours["visual_encoder"][:, 0] @ model.vis_proj.weight, dim=-1)
    assert (t @ v.T - fixture["outputs"]["similarity"]).abs().max() > 1e-3
    assert (ours["itm_logits"].flip(-1) - fixture["outputs"]["itm_logits"]).abs().max() > 1e-3


def test_fixture_report_and_itm_swap(fixture):
    state, cfg, report = authors_to_project(fixture["state_dict"], fixture["config"])
    assert report.ok and not report.missing and not report.unexpected
    assert set(report.dropped) == {"qa_head.weight", "qa_head.bias"}
    assert (cfg.text_layers, cfg.visual_layers, cfg.cross_layers) == (2, 2, 2)  # num_hidden_layers=4
    assert (cfg.vocab_size, cfg.only_word_size, cfg.use_img_layernorm) == (1300, 1100, True)
    w = fixture["state_dict"]["cls.seq_relationship.weight"]
    assert torch.equal(state["heads.itm.classifier.weight"][1], w[0])
    assert torch.equal(state["heads.itm.classifier.weight"][0], w[1])
    back = project_to_authors(state, cfg)
    assert set(back) == set(fixture["state_dict"]) - {"qa_head.weight", "qa_head.bias"}
    for k, v in back.items():
        assert torch.equal(v, fixture["state_dict"][k]), k


def canonical_state(cfg):
    torch.manual_seed(0)
    sd = {f"backbone.{k}": v for k, v in MVPTRModel(cfg).state_dict().items()}
    for name, head in (("mlm", MaskedTokenHead(cfg)), ("mcr", MaskedTokenHead(cfg)), ("itm", ITMHead(cfg))):
        sd.update({f"heads.{name}.{k}": v for k, v in head.state_dict().items()})
    return sd


@pytest.mark.parametrize("img_ln", [True, False])
def test_round_trip_is_exact(img_ln):
    cfg = replace(TINY, use_img_layernorm=img_ln)
    ours = canonical_state(cfg)
    authors = project_to_authors(ours, cfg)
    assert ("bert.LayerNorm.weight" in authors) == img_ln  # their model builds it only when it is used
    back, cfg2, report = authors_to_project(authors, authors_config_from(cfg))
    assert report.ok, report.summary()
    assert cfg2 == replace(cfg, kernels=cfg2.kernels)
    assert back.keys() == ours.keys()
    for k in ours:
        assert torch.equal(back[k], ours[k]), k


def test_project_to_authors_rejects_unknown_keys():
    sd = canonical_state(TINY)
    sd["heads.vqa.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="heads.vqa.weight"):
        project_to_authors(sd, TINY)
    assert "bert.txt_proj" in project_to_authors(sd, TINY, strict=False)
    with pytest.raises(ConfigError, match="equal encoder depths"):
        project_to_authors(canonical_state(TINY), replace(TINY, cross_layers=3))


def base_authors_config():
    return {"vocab_size": 86051, "only_word_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "img_feature_dim": 2054,
            "use_img_layernorm": 1}


def test_report_on_the_real_key_list():
    if not KEYS.is_file():
        pytest.skip(f"{KEYS} not available")
    shapes = {}
    for line in KEYS.read_text().splitlines():
        if line.strip():
            name, shape = line.split(" ", 1)
            shapes[name] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    assert len(shapes) == 318
    zeros = {k: torch.zeros(s) for k, s in shapes.items()}
    state, cfg, report = authors_to_project(zeros, base_authors_config())
    assert report.ok, report.summary()
    assert (cfg.text_layers, cfg.visual_layers, cfg.cross_layers) == (6, 6, 6)
    assert set(report.mapped) | set(report.dropped) == set(shapes)  # every key mapped or reported
    assert set(report.dropped) == {"qa_head.weight", "qa_head.bias"}
    assert sum(v.numel() for k, v in state.items() if k.startswith("backbone.")) == 197_415_169

    # Problems are reported by name.
    broken = dict(zeros)
    del broken["bert.mul_encoder.layer.5.output.dense.bias"]
    broken["bert.pooler.dense.weight"] = torch.zeros(768, 767)
    broken["bert.extra_thing"] = torch.zeros(1)
    _, _, bad = authors_to_project(broken, base_authors_config())
    assert not bad.ok
    assert bad.missing == ["backbone.cross_encoder.layer.5.output.dense.bias"]
    assert bad.unexpected == ["bert.extra_thing"]
    assert len(bad.shape_mismatches) == 1 and "bert.pooler.dense.weight" in bad.shape_mismatches[0]
    assert "backbone.pooler.dense.weight" not in bad.missing
    summary = bad.summary()
    assert "bert.extra_thing" in summary and "qa_head.bias" in summary


def test_convert_original_writes_project_checkpoint(fixture, tmp_path):
    src = tmp_path / "authors.pt"
    torch.save({"state_dict": fixture["state_dict"], "config": fixture["config"]}, src)
    report = convert_original(str(src), str(tmp_path / "out"))
    assert report.ok
    state, run = load_weights(str(tmp_path / "out"))
    assert run.model.vocab_size == 1300 and run.model.text_layers == 2
    expected, _, _ = authors_to_project(fixture["state_dict"], fixture["config"])
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)

    # A raw state dict with the authors' config.json next to it (their release layout).
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    torch.save(fixture["state_dict"], raw_dir / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="config"):
        convert_original(str(raw_dir / "pytorch_model.bin"), str(tmp_path / "out2"))
    (raw_dir / "config.json").write_text(json.dumps(fixture["config"]))
    assert convert_original(str(raw_dir), str(tmp_path / "out2")).ok
    state2, _ = load_weights(str(tmp_path / "out2"))
    assert all(torch.equal(state2[k], expected[k]) for k in expected)


def test_convert_original_refuses_pickled_objects(fixture, tmp_path):
    src = tmp_path / "pickled.pt"
    torch.save({"state_dict": fixture["state_dict"], "config": fixture["config"],
                "args": argparse.Namespace(lr=1e-4)}, src)
    with pytest.raises(ConfigError, match="plain tensors and dicts"):
        convert_original(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_convert_original_strict_on_incomplete_checkpoint(fixture, tmp_path):
    sd = {k: v for k, v in fixture["state_dict"].items() if not k.startswith("half_mlm.")}
    src = tmp_path / "partial.pt"
    torch.save({"state_dict": sd, "config": fixture["config"]}, src)
    with pytest.raises(ConfigError, match="heads.mcr.decoder.weight"):
        convert_original(str(src), str(tmp_path / "out"))
    report = convert_original(str(src), str(tmp_path / "out"), strict=False)
    assert "heads.mcr.bias" in report.missing


def test_only_word_size_read_from_decoder_when_config_lacks_it(fixture):
    config = {k: v for k, v in fixture["config"].items() if k != "only_word_size"}
    _, cfg, report = authors_to_project(fixture["state_dict"], config)
    assert cfg.only_word_size == 1100 and report.ok
    assert any("only_word_size=1100" in n for n in report.notes)
    no_heads = {k: v for k, v in fixture["state_dict"].items() if not k.startswith(("cls.", "half_mlm."))}
    with pytest.raises(ConfigError, match="only_word_size"):
        authors_to_project(no_heads, config)


def test_config_without_img_layernorm_means_off_and_reverse_config_builds_their_model(tmp_path):
    """Their model reads use_img_layernorm with hasattr (absent: off) and its constructors read qa_answer_size,
    img_feature_type and torchscript; the reverse converter writes all of them."""
    config = {k: v for k, v in base_authors_config().items() if k != "use_img_layernorm"}
    notes = []
    from mvptr_ds.compat.authors_ckpt import model_config_from_authors, write_original
    assert model_config_from_authors(config, notes).use_img_layernorm is False
    assert any("use_img_layernorm: off" in n for n in notes)
    written = authors_config_from(TINY)
    for key in ("qa_answer_size", "torchscript", "img_feature_type", "img_layer_norm_eps", "num_contrast_classes"):
        assert key in written, key
    summary = write_original(str(tmp_path / "theirs"), canonical_state(TINY), TINY)
    assert summary["tensors"] > 0 and json.loads((tmp_path / "theirs" / "config.json").read_text()) == written
    back = torch.load(tmp_path / "theirs" / "pytorch_model.bin", weights_only=True)
    state, cfg, report = authors_to_project(back, written)
    assert report.ok and cfg == replace(TINY, kernels=cfg.kernels)
