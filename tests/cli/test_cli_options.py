"""Options generated from the typed config: every field is declared with ``option`` (one home for its default and
its help), so the command line can generate its options from the dataclasses."""
import dataclasses

import pytest

from mvptr_ds import config, ds_configs
from mvptr_ds.config_types import ConfigError

SECTIONS = (config.ModelConfig, config.DataConfig, config.ObjectiveConfig, config.TrainConfig, config.EvalConfig)


@pytest.mark.parametrize("section", SECTIONS, ids=lambda c: c.__name__)
def test_every_config_field_has_its_help(section):
    for f in dataclasses.fields(section):
        text = f.metadata.get("help", "")
        assert text and text.rstrip().endswith("."), f"{section.__name__}.{f.name}: declare it with option(default, help)"
        assert "(default" not in text, f"{f.name}: --help adds the default; the text does not repeat it"


def test_shipped_templates_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"zero1", "zero2", "zero3", "zero2_offload"} <= set(ds_configs.names())
    for spec in ("zero3", "zero3.json", "ds_configs/zero3.json"):
        assert ds_configs.resolve(spec) == f"{ds_configs.FOLDER}/zero3.json"
    mine = tmp_path / "zero3.json"
    mine.write_text("{}")
    assert ds_configs.resolve("zero3.json") == str(mine)  # a file that exists wins over the shipped name
    with pytest.raises(ConfigError, match="nope.json: file not found .shipped templates: zero1"):
        ds_configs.resolve("nope.json")


def test_nothing_in_the_package_imports_the_command_line():
    """run.py is the top of the import graph (finetune/runner.py imported it back: the package's one cycle)."""
    import ast
    from pathlib import Path

    root = Path(config.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "run.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            assert "mvptr_ds.run" not in names, f"{path.relative_to(root)} imports mvptr_ds.run"
