"""Fidelity to the authors' released code: the five losses and every parameter's gradient, and the reverse converter.

The authors' ``BiBertImgForPreTraining`` (``../shared/peer/mvp_pytorch``) runs in a subprocess
(``tests/compat/authors_oracle.py``): it initialises a small model, computes one training step's five losses on a batch
this project's collator built (in their input layout), takes each loss's gradient w.r.t. every parameter, and
records the random choices it made (ITM's side split, WPG's negative pair and top-3 picks). This project's model
then loads the same weights through the converter (``compat.authors_to_project``), takes the same batch with
those choices written into it, and must give the same five losses and gradients within 1e-5 (fp32, dropout off),
with ``--recipe release``. The same subprocess loads a checkpoint written by the reverse converter
(``compat.write_original``) with their ``from_pretrained`` and computes its outputs, which must equal ours.

The model is small (hidden 32, 2 layers per encoder) but has the authors' real vocabulary: 86,051 rows, 30,522
word pieces, concept ids of ``../shared/data/id2phrase_new.json``; about 30 s of CPU time, the subprocess most
of it. Its weights are drawn at 5x BERT's initialiser range so that no loss sits at its untrained value (at 0.02
and width 32 the ITM logits are ~0 and its loss ln 2 whichever negatives are mined).
"""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mvptr_ds.compat import authors_to_project, project_to_authors, write_original
from mvptr_ds.config import RunConfig, apply_recipe
from mvptr_ds.data.batching import BatchContext, Collator
from mvptr_ds.data.caption_files import read_id2phrase
from mvptr_ds.data.types import Example
from mvptr_ds.data.vocab import VocabInfo
from mvptr_ds.objectives import build_pretraining_module
from mvptr_ds.objectives.itm import negative_pairs

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared"
PEER = SHARED / "peer" / "mvp_pytorch"
ID2PHRASE = SHARED / "data" / "id2phrase_new.json"
LOSSES = ("mcr", "vsc", "mlm", "itm", "wpg")
TOL = 1e-5
AUTHORS_CONFIG = {"vocab_size": 86051, "only_word_size": 30522, "hidden_size": 32, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
                  "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
                  "attention_probs_dropout_prob": 0.0, "initializer_range": 0.1, "img_feature_dim": 2054,
                  "img_feature_type": "faster_r-cnn", "use_img_layernorm": 0, "img_layer_norm_eps": 1e-12,
                  "torchscript": True, "qa_answer_size": 2, "num_contrast_classes": 2}
# Two captions share image 0 (the release calls them each other's negatives); one caption has no concept.
IMAGES = (0, 0, 1, 2, 3, 4)
WORDS = (7, 12, 9, 5, 10, 8)
CONCEPTS = (3, 2, 0, 4, 1, 6)
TAGS = (5, 5, 8, 4, 7, 6)
REGIONS = (6, 6, 3, 9, 4, 7)  # >= 3 each: their top-3 needs three regions


def _missing_peer():
    if not PEER.is_dir() or not ID2PHRASE.is_file():
        return f"{PEER} or {ID2PHRASE} not available (a clone without ../shared)"
    probe = subprocess.run([sys.executable, "-c", "import six, boto3, anytree"], capture_output=True)
    if probe.returncode:
        return "the authors' code needs six, boto3 and anytree (pip install six boto3 anytree)"
    return None


pytestmark = pytest.mark.skipif(_missing_peer() is not None, reason=_missing_peer() or "")


def examples(concept_ids):
    """The batch's examples: word pieces of BERT's real range, concept ids of the real vocabulary."""
    rng = np.random.default_rng(7)
    regions = {img: rng.random((n, 2054), dtype=np.float32) for img, n in zip(IMAGES, REGIONS)}
    tags = {img: rng.integers(999, 30522, n).tolist() for img, n in zip(IMAGES, TAGS)}
    out = []
    for i, (img, nw, nc) in enumerate(zip(IMAGES, WORDS, CONCEPTS)):
        concepts = rng.choice(concept_ids, nc, replace=False).tolist()
        out.append(Example(sample_id=i, image_id=img, caption_ids=rng.integers(999, 30522, nw).tolist(),
                           concept_ids=concepts, concept_word_links=[[int(rng.integers(nw))] for _ in concepts],
                           tag_ids=tags[img], regions=regions[img]))
    return out


def authors_inputs(batch):
    """This project's Batch in the authors' input layout (MVPTR.md section 6)."""
    b, lt = batch.text_ids.shape
    lr = batch.region_mask.shape[1]
    phrases = []
    for row in batch.phrase_mask:
        where = row.nonzero().flatten().tolist()
        phrases.append([where[0], where[-1] + 1] if where else [1, 1])
    return {"input_ids_a": batch.text_ids, "attention_mask_a": batch.text_mask.long(),
            "token_type_ids_a": torch.zeros_like(batch.text_ids), "masked_lm_labels_a": batch.mlm_labels,
            "input_ids_b": batch.tag_ids, "token_type_ids_b": torch.ones_like(batch.tag_ids),
            "attention_mask_b": torch.cat([batch.tag_mask, batch.region_mask], 1).long(),
            "masked_lm_labels_b": torch.cat([batch.mcr_labels, torch.full((b, lr), -1)], 1),
            "img_feats": batch.region_feats, "max_tag_length": int(batch.tag_ids.shape[1]),
            "phrase_index": torch.tensor(phrases),
            "img_index": torch.stack([torch.full((b,), lt), lt + batch.region_mask.sum(1)], 1)}


def with_their_choices(batch, theirs):
    """``batch`` with the random choices the authors' forward made (recorded by the oracle)."""
    b = batch.size
    dice = theirs["randperm"][0]
    side = torch.zeros(b, dtype=torch.bool)
    side[dice[:b // 2]] = True  # their first n // 2 of the permutation pair a text with its hardest image
    picks = {"pos": torch.zeros_like(batch.wpg_pick_positive), "neg": torch.zeros_like(batch.wpg_pick_negative)}
    draws = iter(theirs["randint"])
    for i in range(b):
        cols = batch.phrase_mask[i].nonzero().flatten()
        if len(cols):  # their t2i_sim draws only for a row with phrases: positive, then negative
            for kind in ("pos", "neg"):
                picks[kind][i, cols] = (next(draws).float() + 0.5) / 3  # index floor(pick * 3) = their choice
    assert next(draws, None) is None
    return dataclasses.replace(batch, itm_text_side=side, wpg_negative_pair=torch.tensor(theirs["choice"]),
                               wpg_pick_positive=picks["pos"], wpg_pick_negative=picks["neg"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fidelity")
    vocab_file = read_id2phrase(str(ID2PHRASE))
    vocab = VocabInfo(vocab_size=vocab_file.max_id() + 1, only_word_size=30522, pad_id=0, cls_id=101, sep_id=102,
                      mask_id=103, concept_range=(30522, vocab_file.max_id() + 1), word_range=(999, 30522))
    assert vocab.vocab_size == AUTHORS_CONFIG["vocab_size"]
    cfg = apply_recipe(RunConfig(), "release").validate()
    collate = Collator(vocab, cfg.objective_names, mask_prob=0.3, exclude_same_image=cfg.objectives.exclude_same_image)
    batch = collate(examples(np.array(sorted(vocab_file.id_to_tuple))), BatchContext(seed=3))
    assert (batch.mlm_labels >= 0).any() and (batch.mcr_labels >= 0).any()

    # A model of ours (our initialisation) written by the reverse converter, for their from_pretrained.
    _, model_cfg, _ = authors_to_project({}, AUTHORS_CONFIG)
    torch.manual_seed(11)
    export_state = build_pretraining_module(model_cfg, cfg.objective_names, cfg.objectives).state_dict()
    write_original(str(tmp / "export"), export_state, model_cfg)

    spec = {"config": AUTHORS_CONFIG, "seed": 5, "inputs": authors_inputs(batch), "export_dir": str(tmp / "export")}
    torch.save(spec, tmp / "in.pt")
    proc = subprocess.run([sys.executable, str(HERE / "authors_oracle.py"), str(PEER), str(tmp / "in.pt"),
                           str(tmp / "out.pt")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp / "out.pt", weights_only=True)
    return {"cfg": cfg, "batch": batch, "theirs": theirs, "export": (export_state, model_cfg)}


def ours_from(theirs_state, cfg):
    state, model_cfg, report = authors_to_project(theirs_state, AUTHORS_CONFIG)
    assert report.ok, report.summary()
    module = build_pretraining_module(model_cfg, cfg.objective_names, cfg.objectives)
    module.load_state_dict(state, strict=True)
    return module.train(), model_cfg


def test_losses_and_gradients_equal_the_authors(run):
    theirs, cfg = run["theirs"], run["cfg"]
    module, model_cfg = ours_from(theirs["state_dict"], cfg)
    batch = with_their_choices(run["batch"], theirs)
    out = module(batch)

    # The same ITM negatives were mined (their index pairs, in their row order, as a set of pairs).
    with torch.no_grad():
        outputs = module.backbone(batch)
        t2v = outputs.text_embed @ outputs.visual_embed.t()
        text_idx, image_idx, _ = negative_pairs(t2v, t2v.t(), batch.image_ids, batch.image_ids, 0,
                                                batch.itm_text_side, exclude_same_image=False)
    assert sorted(zip(text_idx.tolist(), image_idx.tolist())) == sorted(
        zip(theirs["hard_text"].tolist(), theirs["hard_image"].tolist()))

    errors, scale = {}, {}
    for name in LOSSES:
        assert abs(out.losses[name].item() - theirs["losses"][name].item()) < TOL, (
            name, out.losses[name].item(), theirs["losses"][name].item())
    assert abs(out.loss.item() - theirs["losses"]["total"].item()) < TOL
    params = dict(module.named_parameters())
    for name in LOSSES:
        grads = torch.autograd.grad(out.losses[name], list(params.values()), retain_graph=True, allow_unused=True)
        ours = {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(params.items(), grads)}
        ours = project_to_authors(ours, model_cfg)  # their names, ITM rows swapped, projections transposed
        for key, p in theirs["state_dict"].items():
            if key.startswith("qa_head."):
                assert key not in theirs["grads"][name]  # their QA head: unused by pre-training, not in this project
                continue
            want = theirs["grads"][name].get(key, torch.zeros_like(p))
            errors[(name, key)] = (ours[key] - want).abs().max().item()
            scale[(name, key)] = want.abs().max().item()
    assert len(errors) == len(LOSSES) * len(list(module.parameters()))
    worst = max(errors, key=errors.get)
    print(f"worst gradient error {errors[worst]:.2e} ({worst[0]} w.r.t. {worst[1]}, largest entry "
          f"{scale[worst]:.2e}; largest gradient entry {max(scale.values()):.2e}); losses "
          + ", ".join(f"{n} {out.losses[n].item():.6f}/{theirs['losses'][n].item():.6f}" for n in LOSSES))
    assert errors[worst] < TOL, f"gradient of {worst[0]} w.r.t. {worst[1]}: max abs error {errors[worst]:.2e}"
    # The gradients are not all zero: each loss reaches its own part of the model.
    assert all(theirs["grads"][n]["bert.embeddings.word_embeddings.weight"].abs().sum() > 0 for n in LOSSES)


def test_the_check_can_fail(run):
    """The project's defaults (the corrections) differ from the release on this batch, and so do other choices."""
    theirs = run["theirs"]
    project = RunConfig().validate()
    module, _ = ours_from(theirs["state_dict"], project)
    batch = with_their_choices(run["batch"], theirs)
    out = module(batch)
    assert abs(out.losses["vsc"].item() - theirs["losses"]["vsc"].item()) > 1e-3  # same-image captions left out
    flipped = dataclasses.replace(batch, itm_text_side=~batch.itm_text_side)
    release, _ = ours_from(theirs["state_dict"], run["cfg"])
    assert abs(release(flipped).losses["itm"].item() - theirs["losses"]["itm"].item()) > 1e-4


def test_reverse_converted_checkpoint_loads_into_their_model(run):
    theirs = run["theirs"]
    assert theirs["export_unexpected"] == []
    assert sorted(theirs["export_missing"]) == ["qa_head.bias", "qa_head.weight"]  # not part of this project
    state, model_cfg = run["export"]
    module, _ = ours_from(project_to_authors(state, model_cfg), run["cfg"])
    module.eval()
    batch = run["batch"]
    lt, lg = batch.text_ids.shape[1], batch.tag_ids.shape[1]
    with torch.no_grad():
        o = module.backbone(batch)
        ours = {"text_encoder": o.text, "visual_encoder": o.visual, "cross_encoder": o.cross, "pooled": o.pooled,
                "similarity": o.text_embed @ o.visual_embed.t(), "mlm_logits": module.heads["mlm"](o.cross[:, :lt]),
                "mcr_logits": module.heads["mcr"](o.visual[:, :lg]),
                "itm_logits": module.heads["itm"](o.pooled).flip(-1)}  # ours: 1 = match; theirs: 0
    valid = {"text_encoder": batch.text_mask, "visual_encoder": torch.cat([batch.tag_mask, batch.region_mask], 1),
             "cross_encoder": torch.cat([batch.text_mask, batch.region_mask], 1), "mlm_logits": batch.text_mask,
             "mcr_logits": batch.tag_mask}
    for name, want in theirs["export_outputs"].items():
        got = ours[name]
        if name in valid:  # padded positions are undefined
            got, want = got[valid[name]], want[valid[name]]
        assert (got - want).abs().max().item() < TOL, name
