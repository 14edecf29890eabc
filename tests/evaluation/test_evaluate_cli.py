"""End to end: pre-train the tiny model briefly (stage 1 with MCR and VSC, then stage 2 from it) on a small world,
then ``evaluate`` and ``embed`` through the CLI (functional checks; learnability numbers: BENCHMARKS.md).
"""
import json
import os
import stat

import numpy as np
import torch
import pytest

from conftest import run_cli

import mvptr_ds

WORLD = "synthetic:seed=31,images=160,held_out=32"
STAGE1_STEPS = 2
STAGE2_STEPS = 4
TRAIN = ["--model", "tiny", "--data", WORLD, "--micro_batch", "32", "--lr", "1e-3", "--resume", "none",
         "--wandb", "disabled", "--log_every", "20"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    run_cli(["--stage", "1", "--objectives", "mcr,vsc", "--max_steps", str(STAGE1_STEPS), "--warmup_steps", "2",
             "--save_every", "1000", "--output_dir", str(root / "s1")] + TRAIN, timeout=600)
    run_cli(["--stage", "2", "--max_steps", str(STAGE2_STEPS), "--warmup_steps", "1", "--save_every", "1000",
             "--output_dir", str(root / "s2"), "--init_from", str(root / "s1" / "final")] + TRAIN, timeout=900)
    return root


def test_evaluate_cli_end_to_end(trained):
    out = trained / "eval.json"
    proc = run_cli(["evaluate", "--checkpoint", str(trained / "s2" / "final"), "--output", str(out),
                    "--no_progress"], timeout=300)
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout)["retrieval"] == result["retrieval"]
    ret, gr = result["retrieval"], result["grounding"]
    assert {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum", "n_images", "n_captions"} <= set(ret)
    assert {"accuracy", "chance", "n"} <= set(gr)
    assert result["split"] == "held_out" and result["data"] == WORLD
    assert (ret["n_images"], ret["n_captions"]) == (32, 64) and ret["reranked"]
    assert ret["itm_pairs"] == 32 * 64  # k (128 captions, 64 images) covers every pair of this small split
    assert ret["tr_r1"] <= ret["tr_r5"] <= ret["tr_r10"] and ret["ir_r1"] <= ret["ir_r5"] <= ret["ir_r10"]
    assert 0 < gr["n"] and 0 < gr["chance"] < 100 and 0 <= gr["accuracy"] <= 100


def test_evaluate_reads_deepspeed_checkpoints_and_limits(trained):
    from mvptr_ds.evaluation.evaluate import evaluate

    final = evaluate(str(trained / "s2" / "final"), tasks="retrieval", max_images=8, show_progress=False)
    step = evaluate(str(trained / "s2" / "checkpoints" / f"step{STAGE2_STEPS}"), tasks="retrieval,grounding",
                    max_images=8, show_progress=False)
    assert step["weights"].endswith(f"step{STAGE2_STEPS}")
    for key in ("tr_r1", "tr_r5", "ir_r1", "ir_r5"):
        assert step["retrieval"][key] == pytest.approx(final["retrieval"][key])
    assert final["retrieval"]["n_images"] == 8 and 0 < step["grounding"]["n"]


def test_stage1_model_is_evaluated_on_retrieval_alone(trained):
    """A stage-1 model trained with VSC has a contrastive ranking to evaluate and no cross-modal encoder: by
    default retrieval alone (coarse, not re-ranked) and the output says grounding was skipped; asking for
    grounding is an error line before any work."""
    first = json.loads((trained / "s1" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss/mcr", "loss/vsc"} <= set(first), first
    out = trained / "eval_s1.json"
    proc = run_cli(["evaluate", "--checkpoint", str(trained / "s1" / "final"), "--output", str(out),
                    "--no_progress"], timeout=300)
    result = json.loads(out.read_text())
    assert "grounding" not in result and "cross-modal encoder" in result["skipped"]["grounding"]
    assert "note: grounding not evaluated" in proc.stdout
    ret = result["retrieval"]
    assert not ret["reranked"] and ret["itm_pairs"] == 0 and ret["tr_r1"] == ret["coarse"]["tr_r1"]
    bad = run_cli(["evaluate", "--checkpoint", str(trained / "s1" / "final"), "--tasks", "grounding",
                   "--output", str(trained / "never.json"), "--no_progress"], timeout=300, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: "), bad.stderr
    assert "grounding needs the cross-modal encoder" in bad.stderr
    assert not (trained / "never.json").exists()


def test_grounding_on_a_stage1_model_fails_before_reading_data(trained, monkeypatch):
    import mvptr_ds.evaluation.loading as loading
    from mvptr_ds.config import ConfigError
    from mvptr_ds.evaluation.evaluate import evaluate

    def no_data(*args, **kwargs):
        raise AssertionError("the evaluation data was read before the task check")

    monkeypatch.setattr(loading, "load_eval_data", no_data)
    with pytest.raises(ConfigError, match="grounding needs the cross-modal encoder"):
        evaluate(str(trained / "s1" / "final"), tasks="retrieval,grounding", show_progress=False)


def test_embed_cli_and_encode_api(trained):
    ckpt = str(trained / "s2" / "final")
    out = trained / "emb.npz"
    run_cli(["embed", "--checkpoint", ckpt, "--output", str(out), "--limit", "10"], timeout=300)
    arrays = np.load(out)
    assert set(arrays.files) == {"sample_ids", "image_ids", "text_embed", "visual_embed", "similarity", "text_cls",
                                 "visual_cls", "pooled", "itm_score"}
    assert arrays["text_embed"].shape == (10, 128) and arrays["pooled"].shape == (10, 128)
    np.testing.assert_allclose(np.linalg.norm(arrays["visual_embed"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(arrays["similarity"], (arrays["text_embed"] * arrays["visual_embed"]).sum(1),
                               rtol=1e-5, atol=1e-6)
    enc = mvptr_ds.encode(ckpt, limit=10)
    np.testing.assert_allclose(enc.itm_score, arrays["itm_score"], rtol=1e-4, atol=1e-5)
    assert enc.sample_ids.tolist() == arrays["sample_ids"].tolist()
    stage1 = mvptr_ds.encode(str(trained / "s1"), split="train", limit=3)  # run dir -> its final/; no cross
    assert stage1.pooled is None and stage1.itm_score is None and stage1.text_embed.shape == (3, 128)


def test_a_model_trained_with_the_itm_prior_is_scored_with_it(trained, tmp_path):
    """The same weights with ``objectives.itm_prior`` on in their config.json: ``evaluate`` re-ranks by ITM +
    e^tau S and ``embed``'s itm_score is that score (the option is read from the checkpoint)."""
    import shutil

    from mvptr_ds.evaluation.evaluate import evaluate
    from mvptr_ds.evaluation.loading import load_model
    from mvptr_ds.evaluation.retrieval import evaluate_retrieval, retrieval_set

    plain = str(trained / "s2" / "final")
    prior = tmp_path / "prior"
    shutil.copytree(plain, prior)
    config = json.loads((prior / "config.json").read_text())
    assert config["objectives"]["itm_prior"] is False
    config["objectives"]["itm_prior"] = True
    (prior / "config.json").write_text(json.dumps(config))
    model = load_model(str(prior))
    scale = float(model.backbone.logit_scale.detach().exp())
    assert load_model(plain).itm_prior_scale == 0.0 and model.itm_prior_scale == pytest.approx(scale)
    got = evaluate(str(prior), tasks="retrieval", max_images=12, show_progress=False)["retrieval"]
    assert got["itm_prior_scale"] == pytest.approx(scale)  # the JSON says how it ranked
    from mvptr_ds.evaluation.loading import load_eval_data

    bundle, split, _ = load_eval_data(model, None)
    rset = retrieval_set(split, max_images=12)
    want = evaluate_retrieval(model.backbone, model.itm_head, rset, bundle.collator, itm_prior_scale=scale)
    without = evaluate_retrieval(model.backbone, model.itm_head, rset, bundle.collator)
    assert {k: got[k] for k in ("tr_r1", "tr_r5", "ir_r1", "ir_r5")} == {
        k: want[k] for k in ("tr_r1", "tr_r5", "ir_r1", "ir_r5")}
    keys = ("tr_r1", "tr_r5", "ir_r1", "ir_r5")
    assert any(without[k] != want[k] for k in keys), (without, want)  # the prior changes the ranking here
    head_only, with_prior = mvptr_ds.encode(plain, limit=10), mvptr_ds.encode(str(prior), limit=10)
    np.testing.assert_allclose(with_prior.itm_score, head_only.itm_score + scale * head_only.similarity,
                               rtol=1e-4, atol=1e-4)
    # The authors' code ranks by the head alone: the export says how to score this model.
    notes = [json.loads(run_cli(["export_original", "--checkpoint", ckpt, "--dst", str(tmp_path / name)],
                                timeout=300).stdout).get("note", "") for name, ckpt in (("a", plain), ("b", str(prior)))]
    assert notes[0] == "" and "--itm_prior" in notes[1] and "capped at 100" in notes[1]


def test_final_is_self_contained_and_loads_in_one_line(trained):
    from safetensors.torch import load_file

    from mvptr_ds.data.synthetic import SceneWorld, parse_synthetic_source

    final = trained / "s2" / "final"
    files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    assert files == ["config.json", "id2phrase.json", "model.safetensors", "tokenizer/tokenizer_config.json",
                     "tokenizer/vocab.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(stat.S_IMODE((final / f).stat().st_mode)) for f in files} == {oct(0o666 & ~umask)}  # was 0600
    assert json.loads((final / "config.json").read_text())["mvptr_ds"]["version"] == mvptr_ds.__version__
    model = mvptr_ds.from_pretrained(str(final))
    world = SceneWorld(parse_synthetic_source(WORLD))
    caption = world.captions[0].text
    assert model.tokenizer(caption, add_special_tokens=False)["input_ids"] == world.tokenizer.encode(caption)
    assert model.concepts.id_to_tuple == world.concepts
    weights = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(v, weights[f"backbone.{k}"]) for k, v in model.backbone.state_dict().items())
    assert not model.backbone.training and model.itm_head is not None


def test_clear_errors(trained, tmp_path):
    proc = run_cli(["evaluate", "--checkpoint", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.json")],
                   check=False)
    assert proc.returncode == 2 and "no such directory" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(["evaluate", "--checkpoint", str(trained / "s1" / "final"), "--tasks", "grounding",
                    "--output", str(tmp_path / "x.json")], check=False)
    assert proc.returncode == 2 and "stage-1" in proc.stderr and not (tmp_path / "x.json").exists()
    from mvptr_ds.config import ConfigError
    from mvptr_ds.evaluation.evaluate import evaluate

    with pytest.raises(ConfigError, match="--tasks"):
        evaluate(str(trained / "s2" / "final"), tasks="retrieval,vqa")
    with pytest.raises(ConfigError, match="neither a model.safetensors export"):
        evaluate(str(tmp_path))
