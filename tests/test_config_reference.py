"""One source for each config key: the schema in mitoseg/config.py holds every key's type, default, allowed values
and documentation; docs/configuration.md's reference is generated from it, and the names of networks and methods
are those of their registries."""

import typing
from pathlib import Path

from mitoseg.config import (REFERENCE_BEGIN, REFERENCE_END, SEMI_SUPERVISED_SAFEGUARDS, Config, config_from_dict,
                            config_reference, schema_keys)

ROOT = Path(__file__).resolve().parent.parent


def documented_reference() -> str:
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert REFERENCE_BEGIN in text and REFERENCE_END in text, "docs/configuration.md lost its generated reference"
    return text.split(REFERENCE_BEGIN + "\n", 1)[1].split(REFERENCE_END, 1)[0]


def test_the_configuration_page_is_the_generated_reference():
    # On failure: regenerate the block between the markers with `mitoseg configs keys`.
    assert documented_reference() == config_reference()


def test_every_key_is_documented_once_with_its_default():
    keys = [key for key, _, _ in schema_keys()]
    assert len(keys) == len(set(keys)) > 100
    reference = config_reference()
    defaults = config_from_dict({"data": {"train": {"image": "x.tif"}}})
    for key, f, _ in schema_keys():
        assert f.metadata.get("doc"), f"config key {key} has no documentation"
        assert f"| `{key}` |" in reference
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        if key != "data.train.image":
            assert value == (f.default_factory() if callable(f.default_factory) else f.default), key
    row = next(line for line in reference.splitlines() if line.startswith("| `method.warmup` |"))
    assert f"`{SEMI_SUPERVISED_SAFEGUARDS['warmup']}`" in row  # the default mitoseg init writes, from its source
    assert "`teacher` for `ddfp`" in next(line for line in reference.splitlines()
                                          if line.startswith("| `method.pseudo_labels` |"))


def test_ranges_in_the_reference_are_the_ones_enforced():
    row = next(line for line in config_reference().splitlines() if line.startswith("| `data.batch_size` |"))
    assert "at least 1" in row
    import pytest

    from mitoseg.errors import MitosegError

    with pytest.raises(MitosegError, match="data.batch_size' must be at least 1"):
        config_from_dict({"data": {"train": {"image": "x.tif"}, "batch_size": 0}})


def test_network_and_method_names_are_their_registries():
    from mitoseg.methods.base import _METHODS
    from mitoseg.networks.registry import _BUILDERS

    hints = typing.get_type_hints(Config)
    model_names = typing.get_args(typing.get_type_hints(hints["model"])["name"])
    method_names = typing.get_args(typing.get_type_hints(hints["method"])["name"])
    assert set(model_names) == set(_BUILDERS)
    assert set(method_names) == set(_METHODS)


def test_configs_keys_prints_the_reference(capsys):
    from mitoseg.cli import main

    assert main(["configs", "keys"]) == 0
    assert capsys.readouterr().out == config_reference()


def test_the_napari_rounds_start_from_the_sample_config():
    from mitoseg.config import parse_yaml, resolve_config_path
    from mitoseg_napari._training import base_settings

    sample = parse_yaml(resolve_config_path("sample_daw").read_text())
    settings = base_settings()
    assert settings["model"] == sample["model"] and settings["optim"] == sample["optim"]
    assert settings["data"]["patch_size"] == sample["data"]["patch_size"]
