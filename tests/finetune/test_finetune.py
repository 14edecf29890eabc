"""Fine-tuning: every task trains and evaluates end to end through the CLI on the built-in world; the
task metrics; the readers of the tasks' usual files and their errors on bad rows."""
import itertools
import json
import math
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli

from mvptr_ds.data.export import write_real_formats
from mvptr_ds.data.readers import DataError
from mvptr_ds.data.synthetic import SceneSpec, SceneWorld
from mvptr_ds.finetune import metrics, readers
from mvptr_ds.finetune.synthetic import task_examples, vqa_answers

WORLD = "synthetic:images=16,held_out=6,captions_per_image=2"
FAST = ["--max_steps", "2", "--micro_batch", "4", "--log_every", "1", "--warmup_steps", "1", "--wandb", "disabled",
        "--eval_batch_size", "16"]
METRIC = {"vqa": "vqa_soft_accuracy", "snli_ve": "accuracy", "refcoco": "iou50_accuracy"}


def _finetune(task, out, *extra):
    run_cli(["finetune", "--task", task, "--data", WORLD, "--output_dir", str(out)] + FAST + list(extra), timeout=300)
    report = json.loads((out / "eval.json").read_text())
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert report["task"] == task
    return report, records, load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.parametrize("task, ds_config", [("snli_ve", "zero2"), ("refcoco", "zero3")])
def test_classification_tasks_train_and_evaluate(tmp_path, task, ds_config):
    # refcoco on ZeRO-3: its head reads an intermediate cross-modal layer, the layers above must still
    # run inside module calls for ZeRO-3 to gather them and reduce their (zero) gradients
    report, records, state = _finetune(task, tmp_path / task, "--ds_config", f"ds_configs/{ds_config}.json")
    world = SceneWorld(SceneSpec(images=16, held_out=6, captions_per_image=2))
    expected = len(task_examples(world, task, "held_out", 0))
    result = report[task]
    assert result["n"] == expected
    assert 0.0 <= result[METRIC[task]] <= 100.0 and 0.0 < result["chance"] < 100.0
    assert all(math.isfinite(r[f"loss/{task}"]) for r in records)
    if task == "snli_ve":
        assert state["heads.snli_ve.classifier.weight"].shape[0] == 3
    else:  # the referring head is the backbone itself (cosine at a cross-modal layer)
        assert not any(k.startswith("heads.") for k in state)
    assert any(k.startswith("backbone.cross_encoder.") for k in state)


def test_retrieval_then_vqa_from_its_weights(tmp_path):
    report, records, state = _finetune("retrieval", tmp_path / "ret")
    r = report["retrieval"]
    assert r["n_images"] == 6 and r["n_captions"] == 12 and r["itm_pairs"] > 0
    for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"):
        assert 0.0 <= r[k] <= 100.0
    assert {"loss/vsc", "loss/itm"} <= set(records[-1])
    assert "heads.retrieval.classifier.weight" in state and "backbone.img_layernorm.weight" in state

    report, records, state = _finetune("vqa", tmp_path / "vqa", "--init_from", str(tmp_path / "ret" / "final"))
    init = json.loads((tmp_path / "vqa" / "init_report.json").read_text())
    assert any(k.startswith("backbone.") for k in init["loaded"])
    assert all(k.startswith("heads.vqa.") for k in init["newly_initialised"]) and init["newly_initialised"]
    assert "heads.retrieval.classifier.weight" in init["unused"]
    world = SceneWorld(SceneSpec(images=16, held_out=6, captions_per_image=2))
    assert state["heads.vqa.decoder.weight"].shape[0] == len(vqa_answers(world))
    assert report["vqa"]["n"] == 3 * 6
    assert 0.0 <= report["vqa"]["vqa_soft_accuracy"] <= 100.0


def test_release_heads_and_inputs(tmp_path):
    """VQA: transform started from the pre-trained MLM head's (the release's shared names), tags after the
    question (type 1); retrieval: a new classifier that evaluate re-ranks with; dropout: the model's."""
    import dataclasses

    from mvptr_ds.config import MODEL_PRESETS, ObjectiveConfig, RunConfig
    from mvptr_ds.data.batching import Collator
    from mvptr_ds.evaluation.loading import build_model
    from mvptr_ds.finetune.batching import TaskCollator, TaskExample
    from mvptr_ds.finetune.tasks import FinetuneModule
    from mvptr_ds.objectives import build_pretraining_module
    from mvptr_ds.training.init_from import init_weights
    from mvptr_ds.training.weights import save_weights

    world = SceneWorld(SceneSpec(images=6, held_out=0, captions_per_image=1))
    cfg = dataclasses.replace(MODEL_PRESETS["tiny"], vocab_size=world.vocab.vocab_size,
                              only_word_size=world.vocab.only_word_size, hidden_dropout=0.3)
    pre = build_pretraining_module(cfg, ("mcr", "vsc", "itm", "mlm", "wpg"), ObjectiveConfig())
    save_weights(str(tmp_path / "pre"), pre.state_dict(), RunConfig(model=cfg))
    vqa = FinetuneModule(cfg, "vqa", num_answers=7)
    assert vqa.heads["vqa"].dropout.p == 0.3  # the model's hidden dropout
    lines = init_weights(vqa, str(tmp_path / "pre"))
    assert torch.equal(vqa.heads["vqa"].transform.dense.weight, pre.heads["mlm"].transform.dense.weight)
    assert any("heads.vqa.transform.dense.weight <- heads.mlm.transform.dense.weight" in line for line in lines)

    data_cfg = RunConfig().data
    examples = [TaskExample(world.train[i], answers={0: 1.0}) for i in range(3)]
    tb = TaskCollator(data_cfg, world.vocab, "vqa", 7)(examples)
    plain = Collator.from_config(data_cfg, world.vocab, ())([t.example for t in examples])
    for i, t in enumerate(examples):
        n = int(plain.text_mask[i].sum())
        tags = t.example.tag_ids
        assert tb.batch.text_ids[i, n:n + len(tags)].tolist() == tags
        assert int(tb.batch.text_mask[i].sum()) == n + len(tags)
        assert tb.batch.text_type_ids[i, :n].eq(0).all() and tb.batch.text_type_ids[i, n:n + len(tags)].eq(1).all()
    assert vqa(tb).loss.isfinite()

    ret = FinetuneModule(cfg, "retrieval")
    state = ret.state_dict()
    assert "heads.retrieval.classifier.weight" in state and not any(k.startswith("heads.itm.") for k in state)
    loaded = build_model(state, RunConfig(model=cfg), "test")
    assert torch.equal(loaded.itm_head.classifier.weight, ret.heads["retrieval"].classifier.weight)


def test_bad_task_data_is_one_clear_line_from_the_cli(tmp_path):
    data = _real_dir(tmp_path)
    (data / "snli_ve").mkdir()
    (data / "snli_ve" / "train.jsonl").write_text(
        json.dumps({"Flikr30kID": "0.jpg", "sentence2": "there is a dog", "gold_label": "maybe"}) + "\n")
    proc = run_cli(["finetune", "--task", "snli_ve", "--data", str(data), "--output_dir", str(tmp_path / "out")]
                   + FAST, check=False, timeout=200)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "train.jsonl, line 1, field 'gold_label'" in line[0] and "out of range" in line[0]


# ---------------------------------------------------------------- metrics

def test_vqa_answer_score_is_the_leave_one_out_mean():
    for n, m in itertools.product((1, 3, 10), range(0, 11)):
        if m > n:
            continue
        said = [True] * m + [False] * (n - m)
        subsets = [said[:i] + said[i + 1:] for i in range(n)] if n > 1 else [said]
        brute = sum(min(1.0, sum(s) / 3) for s in subsets) / len(subsets)
        assert metrics.vqa_answer_score(m, n) == pytest.approx(brute)
    assert [round(metrics.vqa_answer_score(m, 10), 6) for m in range(6)] == [0, 0.3, 0.6, 0.9, 1, 1]
    with pytest.raises(ValueError):
        metrics.vqa_answer_score(3, 2)


def test_vqa_soft_accuracy_scores_the_predicted_answer():
    targets = torch.tensor([[0.0, 1.0, 0.3], [0.6, 0.0, 0.9], [0.0, 0.0, 0.0]])
    assert metrics.vqa_soft_accuracy(torch.tensor([1, 0, 2]), targets) == pytest.approx(100 * (1.0 + 0.6) / 3)
    assert metrics.vqa_soft_accuracy(torch.tensor([0, 2, 0]), targets) == pytest.approx(100 * 0.9 / 3)
    with pytest.raises(ValueError):
        metrics.vqa_soft_accuracy(torch.tensor([3, 0, 0]), targets)


def test_task_scores_are_the_metrics_per_example():
    targets = torch.tensor([[0.0, 1.0, 0.3], [0.6, 0.0, 0.9]])
    pred = torch.tensor([1, 0])
    score, chance = metrics.task_scores("vqa", pred, answer_scores=targets)
    assert 100 * float(score.mean()) == pytest.approx(metrics.vqa_soft_accuracy(pred, targets))
    assert chance.tolist() == pytest.approx([1.3 / 3, 1.5 / 3])
    pred, labels = torch.tensor([0, 2, 1]), torch.tensor([0, 1, 1])
    score, chance = metrics.task_scores("snli_ve", pred, labels=labels)
    assert 100 * float(score.mean()) == pytest.approx(metrics.accuracy(pred, labels))
    iou = torch.tensor([[0.6, 0.1, 0.7], [0.2, 0.5, 0.0]])
    score, chance = metrics.task_scores("refcoco", torch.tensor([1, 1]), region_iou=iou,
                                        region_mask=torch.tensor([[True, True, False], [True, True, True]]))
    assert score.tolist() == [0.0, 1.0] and chance.tolist() == pytest.approx([0.5, 1 / 3])


def test_box_iou_and_threshold():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    cases = [([0, 0, 2, 2], 1.0), ([1, 0, 3, 2], 2 / 6), ([2, 2, 4, 4], 0.0), ([0, 0, 1, 1], 0.25),
             ([0, 0, 0, 5], 0.0)]
    for box, want in cases:
        assert float(metrics.box_iou(a, torch.tensor([box], dtype=torch.float))) == pytest.approx(want)
    # unchanged by scaling x and y (normalised vs pixel coordinates)
    b = torch.tensor([[0.5, 0.2, 1.7, 3.0]])
    s = torch.tensor([640.0, 480.0, 640.0, 480.0])
    assert float(metrics.box_iou(a * s, b * s)) == pytest.approx(float(metrics.box_iou(a, b)))
    assert metrics.iou_accuracy(torch.tensor([0.5, 0.49, 0.9, 0.0])) == 50.0


# ---------------------------------------------------------------- readers

@pytest.fixture(scope="module")
def real_world():
    return SceneWorld(SceneSpec(images=4, held_out=0, captions_per_image=1))


def _real_dir(tmp_path, world=None):
    world = world or SceneWorld(SceneSpec(images=4, held_out=0, captions_per_image=1))
    data = tmp_path / "data"
    write_real_formats(world, str(data))
    return data


def _source(data):
    return readers.ImageSource(str(data), str(data / "tokenizer"))


def _write_vqa_official(d, answers):
    d.mkdir(exist_ok=True)
    (d / "answers.json").write_text(json.dumps(answers))
    (d / "train_questions.json").write_text(json.dumps({"questions": [
        {"question_id": 7, "image_id": 1, "question": "is there a man"}]}))
    said = ["yes"] * 2 + ["no"] * 7 + ["maybe"]
    (d / "train_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 7, "answers": [{"answer": a} for a in said]}]}))


def test_vqa_readers(tmp_path, real_world):
    data = _real_dir(tmp_path, real_world)
    source = _source(data)
    answers = readers.read_answers(str(_write(data / "vqa" / "answers.json", ["yes", "no", "red"])))
    _write_vqa_official(data / "vqa", answers)
    ds = readers.read_vqa(source, str(data / "vqa"), "train", answers)
    ex = ds[0]
    assert ex.answers == pytest.approx({0: 0.6, 1: 1.0})  # "maybe" is not in the vocabulary: no target
    assert source.tokenizer.decode(ex.example.caption_ids) == "is there a man"
    assert ex.example.regions.shape == real_world.images[1].regions.shape

    _write(data / "vqa" / "train.jsonl", {"image_id": "2", "question": "the man is", "answers": {"red": 1}})
    assert readers.read_vqa(source, str(data / "vqa"), "train", answers)[0].answers == {2: 1.0}
    _write(data / "vqa" / "train.jsonl", {"image_id": "2", "question": "the man is", "answers": {"purple": 1}})
    with pytest.raises(DataError, match=r"train.jsonl, line 1, field 'answers': unknown answer 'purple'"):
        readers.read_vqa(source, str(data / "vqa"), "train", answers)
    _write(data / "vqa" / "train.jsonl", {"image_id": "99", "question": "the man is", "answers": {"red": 1}})
    with pytest.raises(DataError, match=r"line 1, field 'image_id': image '99' has no region features"):
        readers.read_vqa(source, str(data / "vqa"), "train", answers)


def test_snli_ve_reader(tmp_path, real_world):
    data = _real_dir(tmp_path, real_world)
    rows = [{"Flikr30kID": "1.jpg", "sentence2": "there is a man", "gold_label": "contradiction"},
            {"Flickr30kID": "2", "sentence2": "the man is red", "gold_label": 0}]
    _write(data / "snli_ve" / "snli_ve_dev.jsonl", *rows)
    ds = readers.read_snli_ve(_source(data), str(data / "snli_ve"), "dev")
    assert [ds[i].label for i in range(2)] == [2, 0] and ds[0].example.image_id != ds[1].example.image_id
    _write(data / "snli_ve" / "snli_ve_dev.jsonl", rows[1], dict(rows[1], gold_label=3))
    with pytest.raises(DataError, match=r"snli_ve_dev.jsonl, line 2, field 'gold_label': label 3 is out of range"):
        readers.read_snli_ve(_source(data), str(data / "snli_ve"), "dev")


def test_refcoco_reader_boxes_match_the_world(tmp_path, real_world):
    data = _real_dir(tmp_path, real_world)
    im = real_world.images[3]
    ob = im.objects[0]
    x1, y1, x2, y2 = (float(v) for v in im.boxes[ob.region])
    refs = [{"ref_id": 1, "ann_id": 10, "image_id": 3, "split": "val", "sentences": [{"sent": f"the {ob.name}"}]},
            {"ref_id": 2, "ann_id": 10, "image_id": 3, "split": "train", "sentences": [{"sent": "x"}]}]
    inst = {"images": [{"id": 3, "width": im.width, "height": im.height}],
            "annotations": [{"id": 10, "image_id": 3, "bbox": [x1, y1, x2 - x1, y2 - y1]}]}
    d = data / "refcoco"
    d.mkdir()
    (d / "refs(unc).p").write_bytes(pickle.dumps(refs))
    _write_json(d / "instances.json", inst)
    ds = readers.read_refcoco(_source(data), str(d), "val")
    assert len(ds) == 1
    iou = ds[0].region_iou
    assert int(np.argmax(iou)) == ob.region and iou[ob.region] == pytest.approx(1.0, abs=1e-4)

    inst["annotations"][0]["bbox"] = [x1, y1, im.width, 10.0]  # runs past the right edge
    _write_json(d / "instances.json", inst)
    with pytest.raises(DataError, match=r"instances.json, row 0, field 'bbox': box .* outside the image"):
        readers.read_refcoco(_source(data), str(d), "val")

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    (d / "refs(unc).p").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(DataError, match="only plain data is read"):
        readers.read_refcoco(_source(data), str(d), "val")


def _write(path, *rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows[0]))
    return path


def _write_json(path, obj):
    path.write_text(json.dumps(obj))


def test_launcher_local_rank_does_not_hide_the_command(capsys):
    # deepspeed's launcher runs "run.py --local_rank=N finetune ..."; the command must still be found
    from mvptr_ds.run import main

    assert main(["--local_rank=1", "no_such_command"]) == 2
    assert "unknown command 'no_such_command'" in capsys.readouterr().err


def test_eval_only_scores_a_retrieval_model_as_it_was_trained(tmp_path, capsys):
    """``finetune --eval_only --init_from X``: retrieval takes X's objectives.itm_prior (with a note); other
    tasks, and folders without a config.json (Hugging Face BERT), keep the run's own setting."""
    import dataclasses

    from mvptr_ds.config import EvalConfig, RunConfig, TrainConfig
    from mvptr_ds.finetune.runner import _scored_as_trained

    model = tmp_path / "model"
    model.mkdir()
    saved = RunConfig().to_dict()
    saved["objectives"]["itm_prior"] = True
    (model / "config.json").write_text(json.dumps(saved))
    cfg = RunConfig(train=TrainConfig(init_from=str(model)), eval=EvalConfig(finetune_task="retrieval"))
    assert _scored_as_trained(cfg).objectives.itm_prior is True
    assert "was trained with itm_prior=True" in capsys.readouterr().out
    vqa = dataclasses.replace(cfg, eval=EvalConfig(finetune_task="vqa"))
    assert _scored_as_trained(vqa) == vqa
    bert = dataclasses.replace(cfg, train=TrainConfig(init_from=str(tmp_path)))  # no config.json there
    assert _scored_as_trained(bert) == bert
