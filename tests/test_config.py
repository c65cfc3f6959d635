import pytest
import yaml

from mitoseg.config import Config, apply_overrides, check_paths_exist, config_from_dict, load_config
from mitoseg.errors import MitosegError


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def minimal():
    return {"data": {"train": {"image": "a.tif", "label": "b.tif"}}}


def test_defaults_fill_missing_keys(tmp_path):
    cfg = load_config(write(tmp_path, minimal()))
    assert isinstance(cfg, Config)
    assert cfg.data.train.image == "a.tif"
    assert cfg.data.patch_size == [128, 128]
    assert cfg.method.name == "supervised"
    assert cfg.optim.lr == pytest.approx(1e-3)


def test_int_is_accepted_for_float_and_converted(tmp_path):
    data = minimal()
    data["optim"] = {"lr": 1}
    cfg = load_config(write(tmp_path, data))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_unknown_key_names_it_and_the_closest_valid_key(tmp_path):
    data = minimal()
    data["optim"] = {"learning_rate": 0.1, "lr": 0.1}
    with pytest.raises(MitosegError) as info:
        load_config(write(tmp_path, data))
    assert "optim.learning_rate" in str(info.value)
    data = minimal()
    data["data"]["patchsize"] = [64, 64]
    with pytest.raises(MitosegError, match=r"did you mean 'data.patch_size'"):
        load_config(write(tmp_path, data))


def test_wrong_type_names_key_and_expected_type(tmp_path):
    data = minimal()
    data["train"] = {"iterations": "many"}
    with pytest.raises(MitosegError, match=r"'train.iterations' expects int"):
        load_config(write(tmp_path, data))
    data = minimal()
    data["data"]["patch_size"] = [64, "x"]
    with pytest.raises(MitosegError, match=r"data.patch_size\[1\]' expects int"):
        load_config(write(tmp_path, data))
    data = minimal()
    data["optim"] = {"name": "adam"}
    with pytest.raises(MitosegError, match=r"'optim.name' expects one of 'adamw', 'sgd'"):
        load_config(write(tmp_path, data))
    data = minimal()
    data["train"] = {"amp": "yes"}
    with pytest.raises(MitosegError, match=r"'train.amp' expects bool"):
        load_config(write(tmp_path, data))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(MitosegError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(MitosegError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n  - x: {"))
    with pytest.raises(MitosegError, match="must hold a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_value_constraints(tmp_path):
    data = minimal()
    data["data"]["patch_size"] = [100, 128]
    with pytest.raises(MitosegError, match="multiples of 8"):
        config_from_dict(data)
    data = minimal()
    data["data"]["num_classes"] = 1
    with pytest.raises(MitosegError, match="data.num_classes"):
        config_from_dict(data)
    with pytest.raises(MitosegError, match="data.train.image' is required"):
        config_from_dict({})


def test_overrides_set_dotted_keys_and_are_validated(tmp_path):
    path = write(tmp_path, minimal())
    cfg = load_config(path, ["optim.lr=0.05", "data.patch_size=[64, 64]", "train.amp=false"])
    assert cfg.optim.lr == pytest.approx(0.05)
    assert cfg.data.patch_size == [64, 64]
    assert cfg.train.amp is False
    with pytest.raises(MitosegError, match="unknown config key 'optim.lrr'"):
        load_config(path, ["optim.lrr=0.05"])
    with pytest.raises(MitosegError, match="expects KEY=VALUE"):
        load_config(path, ["optim.lr"])
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_missing_data_path_names_key_and_path(tmp_path):
    cfg = config_from_dict(minimal())
    with pytest.raises(MitosegError) as info:
        check_paths_exist(cfg)
    assert "data.train.image" in str(info.value) and "a.tif" in str(info.value)


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        load_config(path)


def test_unquoted_slice_ranges_stay_strings_and_exponents_are_floats(tmp_path):
    path = write(tmp_path, "data:\n  train: {image: a.tif, slices: 40:45}\noptim: {lr: 1e-3}\n")
    cfg = load_config(path)
    assert cfg.data.train.slices == "40:45"
    assert cfg.optim.lr == pytest.approx(1e-3)
