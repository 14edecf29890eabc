"""Initialisation from a local Hugging Face BERT directory (a tiny BertModel saved in tmp_path)."""
from dataclasses import replace

import pytest
import torch

from mvptr_ds.config import MODEL_PRESETS
from mvptr_ds.model import MVPTRModel, init_from_bert
from mvptr_ds.model.bert_init import BertInitError

transformers = pytest.importorskip("transformers")

BERT_VOCAB, BERT_LAYERS = 90, 12
CFG = replace(MODEL_PRESETS["tiny"], hidden_size=32, num_attention_heads=4, intermediate_size=64,
              vocab_size=120, only_word_size=BERT_VOCAB, max_position_embeddings=24, text_layers=2,
              visual_layers=2, cross_layers=2, kernels="torch")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=BERT_VOCAB, hidden_size=32, num_hidden_layers=BERT_LAYERS,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=24,
                                     hidden_act="gelu", layer_norm_eps=1e-12)
    bert = transformers.BertModel(config).eval()
    path = tmp_path_factory.mktemp("bert")
    bert.save_pretrained(str(path))
    return path, bert


def text_inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, BERT_VOCAB, (3, 9), generator=g)  # word pieces only: no concepts
    mask = torch.arange(9)[None, :] < torch.tensor([9, 5, 7])[:, None]
    return ids * mask, mask


def test_text_encoder_reproduces_bert(bert_dir):
    path, bert = bert_dir
    torch.manual_seed(1)
    model = MVPTRModel(CFG).eval()
    report = init_from_bert(model, str(path), text_layers=range(0, 2), cross_layers=range(2, 4),
                            visual_layers=range(0, 2))
    ids, mask = text_inputs()
    with torch.no_grad():
        ours = model.encode_text(ids, mask)
        ref = bert(input_ids=ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(ids),
                   output_hidden_states=True).hidden_states[2]  # after BERT layers 0-1
    assert (ours[mask] - ref[mask]).abs().max() < 1e-5
    assert report.sources["text_encoder.layer.1.output.dense.weight"] == "encoder.layer.1.output.dense.weight"
    assert report.sources["cross_encoder.layer.0.attention.self.query.weight"] == \
        "encoder.layer.2.attention.self.query.weight"
    assert torch.equal(model.cross_encoder.layer[1].intermediate.dense.weight,
                       bert.encoder.layer[3].intermediate.dense.weight)
    assert torch.equal(model.pooler.dense.weight, bert.pooler.dense.weight)


def test_report_and_concept_rows(bert_dir):
    path, bert = bert_dir
    torch.manual_seed(1)
    model = MVPTRModel(CFG)
    concept_rows = model.embeddings.word_embeddings.weight[BERT_VOCAB:].clone()
    report = init_from_bert(model, str(path))  # default ranges 0-5 / 6-11 / 0-5 on 2-layer encoders
    words = model.embeddings.word_embeddings.weight
    assert torch.equal(words[:BERT_VOCAB], bert.embeddings.word_embeddings.weight)
    assert torch.equal(words[BERT_VOCAB:], concept_rows)  # concept rows keep their init
    assert report.sources["embeddings.word_embeddings.weight"] == f"embeddings.word_embeddings.weight[0:{BERT_VOCAB}]"
    assert torch.equal(model.cross_encoder.layer[0].output.dense.weight, bert.encoder.layer[6].output.dense.weight)
    assert set(report.new) == {"img_embedding.weight", "img_embedding.bias", "img_layernorm.weight",
                               "img_layernorm.bias", "txt_proj.weight", "vis_proj.weight", "logit_scale"}
    assert any("takes the first 2" in n and "cross_encoder" in n for n in report.notes)
    assert any("rows 90..119 keep their initialisation" in n for n in report.notes)
    assert "encoder.layer.11.output.dense.weight" in report.unused
    assert "text_encoder.layer.0.attention.self.key.bias <- encoder.layer.0.attention.self.key.bias" \
        in report.summary()


def test_legacy_bin_checkpoint(bert_dir, tmp_path):
    """``pytorch_model.bin`` with ``bert.`` prefixes and LayerNorm gamma/beta (the original BERT release)."""
    path, bert = bert_dir
    legacy = {}
    for k, v in bert.state_dict().items():
        k = "bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[k] = v.clone()
    legacy["cls.predictions.bias"] = torch.zeros(BERT_VOCAB)
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    model = MVPTRModel(CFG).eval()
    report = init_from_bert(model, str(tmp_path), text_layers=range(0, 2), cross_layers=range(2, 4),
                            visual_layers=range(0, 2))
    assert torch.equal(model.embeddings.LayerNorm.weight, bert.embeddings.LayerNorm.weight)
    assert torch.equal(model.text_encoder.layer[1].output.LayerNorm.bias, bert.encoder.layer[1].output.LayerNorm.bias)
    assert "cls.predictions.bias" in report.unused


def test_errors_name_the_problem(bert_dir, tmp_path):
    path, _ = bert_dir
    with pytest.raises(BertInitError, match="no model.safetensors or pytorch_model.bin"):
        init_from_bert(MVPTRModel(CFG), str(tmp_path))
    with pytest.raises(BertInitError, match="BERT layers \\[12, 13\\]"):
        init_from_bert(MVPTRModel(CFG), str(path), cross_layers=range(12, 14))
    wide = replace(CFG, hidden_size=48, intermediate_size=96)
    with pytest.raises(BertInitError, match="word_embeddings"):
        init_from_bert(MVPTRModel(wide), str(path))


def test_stage1_model(bert_dir):
    path, _ = bert_dir
    model = MVPTRModel(CFG, with_cross=False)
    report = init_from_bert(model, str(path))
    assert any("cross_encoder: not built" in n for n in report.notes)
    assert not any(k.startswith("pooler") for k in report.sources)


def test_pretraining_heads_from_bert_for_pretraining(tmp_path):
    """A BertForPreTraining checkpoint also starts the MLM head (transform, bias) and the ITM head (NSP, rows
    swapped); both decoders become clones of the word-embedding rows just loaded (the release's tie_weights)."""
    from mvptr_ds.config import ObjectiveConfig
    from mvptr_ds.model.bert_init import is_bert_directory
    from mvptr_ds.objectives import build_pretraining_module

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=BERT_VOCAB, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=24)
    bert = transformers.BertForPreTraining(config).eval()
    bert.save_pretrained(str(tmp_path))
    assert is_bert_directory(str(tmp_path)) and not is_bert_directory(str(tmp_path / "nothing"))
    module = build_pretraining_module(CFG, ("mcr", "vsc", "itm", "mlm", "wpg"), ObjectiveConfig())
    mcr_transform = module.heads["mcr"].transform.dense.weight.clone()
    report = init_from_bert(module.backbone, str(tmp_path), heads=module.heads)
    words = bert.bert.embeddings.word_embeddings.weight
    for name in ("mlm", "mcr"):
        assert torch.equal(module.heads[name].decoder.weight, words[:BERT_VOCAB])
    assert torch.equal(module.heads["mlm"].transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    assert torch.equal(module.heads["mlm"].bias, bert.cls.predictions.bias)
    assert torch.equal(module.heads["mcr"].transform.dense.weight, mcr_transform)  # no BERT counterpart
    assert torch.equal(module.heads["itm"].classifier.weight, bert.cls.seq_relationship.weight.flip(0))
    assert "heads.mcr.transform.dense.weight" in report.new and "heads.mlm.bias" in report.sources
    assert not [k for k in report.unused if k.startswith("cls.")]


@pytest.mark.slow
def test_init_from_a_bert_folder_on_the_command_line(tmp_path):
    """``--init_from`` a BERT saved by transformers: the paper's initialisation, reported in init_report.json.
    One step at lr 1e-12 leaves the weights where the initialisation put them."""
    import json

    from safetensors.torch import load_file

    from conftest import run_cli

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=80, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=512, max_position_embeddings=128)
    bert = transformers.BertForPreTraining(config).eval()
    bert.save_pretrained(str(tmp_path / "bert"))
    out = tmp_path / "run"
    proc = run_cli(["--stage", "2", "--model", "tiny", "--data", "synthetic:images=8,held_out=0",
                    "--max_steps", "1", "--micro_batch", "4", "--lr", "1e-12", "--warmup_steps", "0",
                    "--wandb", "disabled", "--init_from", str(tmp_path / "bert"), "--output_dir", str(out)])
    assert "(Hugging Face BERT)" in proc.stdout + proc.stderr
    assert "hardest negatives" not in proc.stdout  # the cold-start note is for runs from random weights
    report = json.loads((out / "init_report.json").read_text())
    assert report["kind"] == "huggingface_bert"
    loaded = report["loaded"]
    assert loaded["backbone.cross_encoder.layer.1.output.dense.weight"] == "encoder.layer.3.output.dense.weight"
    assert loaded["backbone.visual_encoder.layer.0.output.dense.weight"] == "encoder.layer.0.output.dense.weight"
    assert "backbone.img_embedding.weight" in report["newly_initialised"]
    assert "heads.mcr.transform.dense.weight" in report["newly_initialised"]
    w = load_file(str(out / "final" / "model.safetensors"))
    words = bert.bert.embeddings.word_embeddings.weight
    only_word = w["heads.mlm.decoder.weight"].shape[0]  # the world's word vocabulary (BERT has 80 rows here)
    rows = min(80, only_word)
    for got, want in ((w["backbone.embeddings.word_embeddings.weight"][:rows], words[:rows]),
                      (w["heads.mcr.decoder.weight"][:rows], words[:rows]),
                      (w["backbone.cross_encoder.layer.0.attention.self.query.weight"],
                       bert.bert.encoder.layer[2].attention.self.query.weight),
                      (w["heads.itm.classifier.weight"], bert.cls.seq_relationship.weight.flip(0))):
        assert (got - want).abs().max() < 1e-6
