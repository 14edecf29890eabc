"""``final/`` is self-contained: weights, config with what wrote it, tokenizer and concept vocabulary, files that
follow the umask (safetensors alone would write 0600). End to end (a trained run's final/, from_pretrained):
tests/evaluation/test_evaluate_cli.py."""
import json
import os
import stat
import subprocess

import pytest
import torch

import mvptr_ds
from conftest import REPO
from mvptr_ds.config import DataConfig, RunConfig
from mvptr_ds.data.export import write_vocabulary
from mvptr_ds.data.synthetic import SceneWorld, parse_synthetic_source, scene_vocabulary
from mvptr_ds.training.weights import load_weights, provenance, save_weights


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_model_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_weights(str(tmp_path / "m"), {"w": torch.ones(2)}, RunConfig())
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert mode(tmp_path / "m" / name) == 0o666 & ~umask, name


def test_config_carries_the_version_and_commit_and_still_loads(tmp_path):
    save_weights(str(tmp_path), {"w": torch.ones(2)}, RunConfig())
    written = json.loads((tmp_path / "config.json").read_text())["mvptr_ds"]
    assert written == provenance() and written["version"] == mvptr_ds.__version__
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert written["git_commit"] == head.strip() and isinstance(written["git_dirty"], bool)
    state, cfg = load_weights(str(tmp_path))  # the provenance is no setting: the config loads as it was
    assert cfg == RunConfig() and torch.equal(state["w"], torch.ones(2))


def test_the_built_in_worlds_vocabulary_without_its_images(tmp_path):
    source = "synthetic:seed=5,images=12,held_out=4"
    world = SceneWorld(parse_synthetic_source(source))
    tokenizer, concepts = scene_vocabulary(parse_synthetic_source(source))
    assert tokenizer.words == world.tokenizer.words and concepts == world.concepts
    write_vocabulary(str(tmp_path), DataConfig(source=source))
    assert (tmp_path / "tokenizer" / "vocab.txt").read_text().split("\n")[:-1] == world.tokenizer.words
    assert {int(k): tuple(v) for k, v in json.loads((tmp_path / "id2phrase.json").read_text()).items()} == concepts


def test_a_data_directorys_tokenizer_and_concepts_are_copied(tmp_path):
    data = tmp_path / "data"
    (data / "tokenizer").mkdir(parents=True)
    (data / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (data / "tokenizer" / "special_tokens_map.json").write_text("{}")
    (data / "id2phrase.json").write_text('{"2": ["dog"]}')
    write_vocabulary(str(tmp_path / "final"), DataConfig(source=str(data)))
    for name in ("tokenizer/vocab.txt", "tokenizer/special_tokens_map.json", "id2phrase.json"):
        assert (tmp_path / "final" / name).read_bytes() == (data / name).read_bytes()
