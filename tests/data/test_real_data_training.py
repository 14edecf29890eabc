"""The real-data path end to end: synthetic world -> real formats -> feature store -> training."""
import json

import numpy as np
import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_synth_convert_and_train(tmp_path):
    data = tmp_path / "data"
    run_cli(["synth", "--out", str(data), "--data", "synthetic:seed=4,images=24,captions_per_image=2"])
    for name in ("features.tsv", "features.lineidx", "predictions.tsv", "captions.jsonl", "id2phrase.json"):
        assert (data / name).is_file(), name
    # Train straight from the TSV (slow path) for one step, then from the converted store.
    run_cli(["--stage", "2", "--data", str(data), "--output_dir", str(tmp_path / "tsv_run"), "--max_steps", "1",
             "--micro_batch", "4", "--wandb", "disabled"])
    run_cli(["convert_features", "--tsv", str(data / "features.tsv"), "--out", str(data / "features")])
    from mvptr_ds.data import FeatureStore, TsvFeatureStore
    store, tsv = FeatureStore(str(data / "features")), TsvFeatureStore(str(data / "features.tsv"), progress=False)
    assert sorted(store.ids()) == sorted(tsv.ids())
    first = store.ids()[0]
    np.testing.assert_allclose(store[first], tsv[first].astype(np.float16).astype(np.float32))
    out = tmp_path / "store_run"
    run_cli(["--stage", "2", "--data", str(data), "--output_dir", str(out), "--max_steps", "3", "--micro_batch", "4",
             "--log_every", "1", "--wandb", "disabled"])
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss/mlm"] > 0 for r in records)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["source"] == str(data)


def test_directory_without_tokenizer_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli(["--data", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o"), "--wandb", "disabled"],
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--tokenizer" in proc.stderr
