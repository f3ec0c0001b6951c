"""hmoe.configs: the shipped configs by name, paths still winning, and `hmoe configs`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hmoe import configs
from hmoe.cli import main
from hmoe.data.preprocess import load_dataset_config
from hmoe.train import load_run_config

ROOT = Path(__file__).resolve().parents[2]


def test_names_are_the_shipped_files():
    assert configs.names("dataset") == sorted(
        p.stem for p in (ROOT / "configs" / "datasets").glob("*.yaml"))
    assert configs.names("run") == ["quickstart"]


@pytest.mark.parametrize("name", configs.names("dataset"))
def test_every_dataset_config_loads_by_name_and_has_a_description(name):
    config = load_dataset_config(name)
    assert config.schema.name == name
    description = configs.describe("dataset", name)
    assert description and "\n" not in description


def test_a_run_config_by_name_equals_its_file():
    assert load_run_config("quickstart") == load_run_config(str(ROOT / "configs/quickstart.yaml"))
    assert configs.describe("run", "quickstart")


def test_a_path_still_works_and_a_file_beats_a_name(tmp_path, monkeypatch):
    assert load_dataset_config(str(ROOT / "configs/datasets/avazu.yaml")).schema.name == "avazu"
    # a file called "criteo" in the working directory is what the user means
    mine = yaml.safe_load((ROOT / "configs/datasets/avazu.yaml").read_text())
    (tmp_path / "criteo").write_text(yaml.safe_dump({**mine, "name": "my_criteo"}))
    monkeypatch.chdir(tmp_path)
    assert load_dataset_config("criteo").schema.name == "my_criteo"


@pytest.mark.parametrize("value", ["criteo.yaml", "sub/criteo", "a: 1\nb: 2",
                                   "name: x\n" + "features: []\n" * 40])  # longer than NAME_MAX
def test_paths_and_yaml_text_are_left_to_the_loader(value):
    assert configs.resolve(value, "dataset") == value


def test_unknown_names_list_the_shipped_ones():
    with pytest.raises(ValueError, match=r"no shipped dataset config named 'critter'.*'criteo'"):
        configs.resolve("critter", "dataset")
    with pytest.raises(ValueError, match=r"no shipped run config named 'fast'.*'quickstart'"):
        load_run_config("fast")
    with pytest.raises(ValueError, match="kind: must be one of"):
        configs.names("model")


def test_data_dataset_is_checked_when_the_config_is_read():
    base = ["data.source=files", "data.files=train.csv"]
    assert load_run_config(None, base + ["data.dataset=criteo"]).data.dataset == "criteo"
    with pytest.raises(ValueError, match=r"^data\.dataset: no shipped dataset config named"):
        load_run_config(None, base + ["data.dataset=critter"])


def test_a_description_must_be_text():
    with pytest.raises(ValueError, match="description: must be a string"):
        load_run_config(None, ["description=[1, 2]"])


def test_cli_lists_names_and_descriptions(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for name in configs.names("dataset") + configs.names("run"):
        assert name in out
    assert configs.describe("dataset", "criteo") in out
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "criteo" in out and "quickstart" not in out


def test_info_lists_the_names():
    from hmoe.info import report

    text = report()
    assert "criteo" in text and "quickstart" in text
