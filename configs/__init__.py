"""The configs shipped with hmoe, installed as package data (``hmoe.configs``).

Two kinds, each a YAML file with a top-level ``description`` (one line):

    datasets/<name>.yaml   dataset configs: a schema plus how raw files become rows
                           (``--data.dataset=<name>``, ``hmoe.data.load_dataset_config("<name>")``)
    <name>.yaml            run configs (``hmoe train --config <name>``; quickstart is the
                           README's main job)

A value names a shipped config when it is a bare name (no directory, no ``.yaml`` suffix) and no
file of that name exists; anything else is a path, so a user's own file always wins.
``hmoe configs`` and ``python -m hmoe.info`` list the names with their descriptions.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["KINDS", "describe", "names", "path_of", "resolve"]

# kind -> the folder of hmoe.configs that holds it
KINDS = {"dataset": "datasets", "run": "."}


def _folder(kind: str):
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {sorted(KINDS)}, got {kind!r}")
    root = resources.files(__name__)
    return root if KINDS[kind] == "." else root.joinpath(KINDS[kind])


def names(kind: str) -> list[str]:
    """The shipped configs of a kind, sorted."""
    return sorted(entry.name.removesuffix(".yaml") for entry in _folder(kind).iterdir()
                  if entry.is_file() and entry.name.endswith(".yaml"))


def path_of(kind: str, name: str) -> Path:
    """The file of a shipped config; ValueError listing the names when there is none."""
    entry = _folder(kind).joinpath(f"{name}.yaml")
    if not entry.is_file():
        raise ValueError(f"no shipped {kind} config named {name!r}; shipped: {names(kind)}")
    return Path(os.fspath(entry))


def _is_name(value: str) -> bool:
    return bool(value) and "\n" not in value and not any(
        sep in value for sep in ("/", os.sep)) and not value.endswith((".yaml", ".yml"))


def resolve(value, kind: str):
    """A path for a config given as a path or a shipped name; anything else as it came.

    An existing file is returned as is (a user's file beats a shipped name); a bare name is
    looked up among the shipped configs of ``kind`` (ValueError naming the shipped ones if it
    is not there); mappings, YAML text and other paths are left to the loader.
    """
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = os.fspath(value)
    if not _is_name(text) or Path(text).is_file():  # YAML text is never stat'ed
        return value
    return path_of(kind, text)


def describe(kind: str, name: str) -> str:
    """The config's one-line ``description`` ("" when it has none)."""
    import yaml

    with open(path_of(kind, name), encoding="utf-8") as f:
        data = yaml.safe_load(f)
    description = data.get("description") if isinstance(data, dict) else None
    return " ".join(str(description).split()) if description else ""
