"""Checkpoint helpers in-process: RNG states survive ``weights_only=True``, pruning, resume resolution,
metrics truncation, the safe loader and the world-size/ZeRO-stage plan of an elastic resume."""
import hashlib
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from mvptr_ds.config import ConfigError
from mvptr_ds.training import checkpoint, elastic
from mvptr_ds.training.safe_load import check_manifest, safe_torch_load
from mvptr_ds.training.logging import truncate_metrics


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # a cached gaussian in numpy's state
    state = checkpoint.rng_state()
    path = tmp_path / "rng.pt"
    torch.save({"rng": [state]}, path)
    loaded = torch.load(path, weights_only=True)["rng"][0]  # plain tensors/lists only: no allow list needed
    expected = (random.random(), np.random.rand(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(loaded)
    got = (random.random(), np.random.rand(), np.random.normal(), torch.rand(3))
    assert expected[:3] == got[:3] and torch.equal(expected[3], got[3])


def make_step(root, step, complete=True):
    path = os.path.join(root, f"step{step}")
    os.makedirs(path)
    with open(os.path.join(path, "x.pt"), "w") as f:
        f.write("x")
    if complete:
        with open(os.path.join(path, checkpoint.COMPLETE), "w") as f:
            json.dump({"step": step, "files": {"x.pt": 1}}, f)
    return path


def test_prune_keeps_newest_complete_and_never_newer_ones(tmp_path):
    root = str(tmp_path)
    for s in (1, 2, 3, 4, 9):
        make_step(root, s)
    make_step(root, 0, complete=False)  # old leftover of a killed save
    make_step(root, 5, complete=False)  # newer incomplete: untouched (re-saved later)
    os.makedirs(os.path.join(root, ".removing-step7-1"))  # a removal that was killed
    checkpoint.prune(root, keep_last=2, upto=4)
    assert sorted(os.listdir(root)) == ["step3", "step4", "step5", "step9"]


def test_resolve_resume(tmp_path):
    out = tmp_path / "run"
    root = checkpoint.checkpoint_root(str(out))
    assert checkpoint.resolve_resume("auto", str(out)) is None
    assert checkpoint.resolve_resume("none", str(out)) is None
    os.makedirs(root)
    make_step(root, 2)
    make_step(root, 4, complete=False)  # interrupted save: never picked
    assert checkpoint.resolve_resume("auto", str(out)) == os.path.join(root, "step2")
    assert checkpoint.resolve_resume(str(out), "elsewhere") == os.path.join(root, "step2")
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):
        checkpoint.resolve_resume("none", str(out))
    with pytest.raises(ConfigError, match=r"step4/COMPLETE: missing; the checkpoint is incomplete"):
        checkpoint.resolve_resume(os.path.join(root, "step4"), str(out))


def test_truncate_metrics_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    truncate_metrics(str(path), 3)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]


def test_manifest_names_truncated_and_missing_files(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"12345")
    digest = hashlib.sha256(b"12345").hexdigest()
    check_manifest(str(tmp_path), {"a.pt": {"size": 5, "sha256": digest}})
    with pytest.raises(ConfigError, match=r"a.pt: truncated or modified \(5 bytes, 9 when"):
        check_manifest(str(tmp_path), {"a.pt": {"size": 9, "sha256": digest}})
    with pytest.raises(ConfigError, match=r"b.pt: missing"):
        check_manifest(str(tmp_path), {"a.pt": {"size": 5, "sha256": digest}, "b.pt": {"size": 1, "sha256": digest}})
    with pytest.raises(ConfigError, match=r"field 'files'\['a.pt'\] must be"):  # sizes only: refused
        check_manifest(str(tmp_path), {"a.pt": 5})
    with pytest.raises(ConfigError, match=r"no file manifest"):
        check_manifest(str(tmp_path), None)


class _Exploit:
    def __reduce__(self):
        return (os.getcwd, ())


def test_safe_loader_refuses_code_and_reads_tensors(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "step": 3, "ids": [1, 2]}, good)
    assert safe_torch_load(str(good))["step"] == 3
    torch.save({"w": _Exploit()}, bad)
    with pytest.raises(ConfigError, match=r"bad.pt: refusing to load: the file holds pickled posix.getcwd"):
        safe_torch_load(str(bad))
    with pytest.raises(ConfigError, match=r"missing.pt: file not found"):
        safe_torch_load(str(tmp_path / "missing.pt"))


def test_elastic_plan():
    meta = {"world_size": 2, "zero_stage": 2}
    assert elastic.plan_resume("/c/step2", meta, 2, 2).universal is False
    plan = elastic.plan_resume("/c/step2", meta, 3, 2)
    assert plan.universal and "2 ranks (ZeRO stage 2) -> 3 ranks" in plan.describe(3, 2)
    assert elastic.plan_resume("/c/step2", meta, 2, 3).universal  # stage change
    assert not elastic.plan_resume("/c/step2", {"world_size": 2, "zero_stage": 0}, 1, 0).universal
    assert elastic.rank_rng_state([{"a": 0}, {"a": 1}], 1) == {"a": 1}
    assert elastic.rank_rng_state([{"a": 0}], 2) is None


def test_a_resume_keeps_the_itm_score_its_head_was_trained_for(tmp_path):
    """A checkpoint of a --itm_prior run resumes only with --itm_prior (and one without, only without); a
    checkpoint config from before the option reads as without."""
    import dataclasses

    from mvptr_ds.config import ObjectiveConfig, RunConfig

    plain = RunConfig()
    prior = dataclasses.replace(plain, objectives=ObjectiveConfig(itm_prior=True))
    saved = plain.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(saved))
    checkpoint.check_compatible(str(tmp_path), plain)
    with pytest.raises(ConfigError, match="itm_prior=False in the checkpoint, True in this run"):
        checkpoint.check_compatible(str(tmp_path), prior)
    del saved["objectives"]["itm_prior"]  # written before the option existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    checkpoint.check_compatible(str(tmp_path), plain)
    saved["objectives"]["itm_prior"] = True
    (tmp_path / "config.json").write_text(json.dumps(saved))
    checkpoint.check_compatible(str(tmp_path), prior)
    with pytest.raises(ConfigError, match="itm_prior=True in the checkpoint, False in this run"):
        checkpoint.check_compatible(str(tmp_path), plain)
