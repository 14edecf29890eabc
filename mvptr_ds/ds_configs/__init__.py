"""The shipped DeepSpeed templates (``zero2.json``, ...) and how ``--ds_config`` finds one.

They ship inside the package (package data), so ``--ds_config zero3`` works from any folder and from a wheel;
the repository's top-level ``ds_configs`` links here, so ``--ds_config ds_configs/zero3.json`` works too.
"""
import os

from mvptr_ds.config_types import ConfigError

FOLDER = os.path.dirname(os.path.abspath(__file__))


def names() -> list:
    """The shipped templates' names (``zero2``, ...), sorted."""
    return sorted(f[:-len(".json")] for f in os.listdir(FOLDER) if f.endswith(".json"))


def resolve(spec: str) -> str:
    """The absolute path of the template ``spec`` names: a JSON file that exists, else a shipped template by
    name (``zero3``, ``zero3.json`` or ``ds_configs/zero3.json`` from any folder). ConfigError when neither."""
    spec = str(spec)
    if os.path.isfile(spec):
        return os.path.abspath(spec)
    folder, name = os.path.split(spec)
    name = name[:-len(".json")] if name.endswith(".json") else name
    if os.path.basename(folder.rstrip(os.sep)) in ("", "ds_configs") and name in names():
        return os.path.join(FOLDER, f"{name}.json")
    if os.path.isdir(spec):
        raise ConfigError(f"--ds_config {spec}: a directory, not a JSON file")
    raise ConfigError(f"--ds_config {spec}: file not found (shipped templates: {', '.join(names())})")
