import dataclasses
import typing

import pytest
import yaml

from mitoseg.config import Config, apply_overrides, config_from_dict, load_config
from mitoseg.data.factory import check_paths_exist
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
    from mitoseg.config import builtin_configs, config_description

    configs = builtin_configs()
    assert "sample_daw" in configs and "lucchi_cpu" in configs
    for name, path in configs.items():
        assert load_config(name) == load_config(path)  # by built-in name or by path: the same config
        # `mitoseg configs` lists each with its first comment line: a one-line summary
        description = config_description(path)
        assert description and len(description) <= 120, (name, description)
        assert path.read_text().startswith(f"# {description}\n"), name


def test_unquoted_slice_ranges_stay_strings_and_exponents_are_floats(tmp_path):
    path = write(tmp_path, "data:\n  train: {image: a.tif, slices: 40:45}\noptim: {lr: 1e-3}\n")
    cfg = load_config(path)
    assert cfg.data.train.slices == "40:45"
    assert cfg.optim.lr == pytest.approx(1e-3)


# Each key with a value just outside its allowed range (refused) and one at the edge (accepted),
# so a range that is too strict fails this test as well as one that is too loose.
RANGE_CASES = [
    ("seed", "-1", "0", "in [0, 4294967295]"),
    ("data.batch_size", "0", "1", "at least 1"),
    ("data.unlabeled_batch_size", "0", "1", "at least 1"),
    ("data.num_workers", "-1", "0", "at least 0"),
    ("data.num_classes", "1", "2", "at least 2"),
    ("data.crop_size", "7", "8", "at least 8"),
    ("data.foreground_sampling", "1.5", "1.0", "in [0, 1]"),
    ("data.cutmix_prob", "-0.1", "0.0", "in [0, 1]"),
    ("data.normalize.lower", "-1", "0", "in [0, 100]"),
    ("data.normalize.upper", "101", "100", "in [0, 100]"),
    ("data.augment.intensity_scale", "1.0", "0.99", "in [0, 1)"),
    ("data.augment.intensity_shift", "-0.1", "0", "at least 0"),
    ("data.augment.noise_std", "-0.1", "0", "at least 0"),
    ("data.augment.prob", "2", "1", "in [0, 1]"),
    ("data.strong.brightness", "-0.1", "0", "at least 0"),
    ("data.strong.contrast", "1", "0", "in [0, 1)"),
    ("data.strong.blur_prob", "1.1", "1", "in [0, 1]"),
    ("data.strong.noise_std", "-1", "0", "at least 0"),
    ("data.strong.prob", "-0.5", "0", "in [0, 1]"),
    ("model.in_channels", "0", "1", "at least 1"),
    ("model.num_res_units", "-1", "0", "at least 0"),
    ("model.feature_channels", "0", "1", "at least 1"),
    ("model.head_channels", "0", "1", "at least 1"),
    ("model.dropout", "1.0", "0.5", "in [0, 1)"),
    ("model.width", "3", "4", "at least 4"),
    ("method.threshold", "1.01", "1.0", "in [0, 1]"),
    ("method.fp_dropout", "1", "0", "in [0, 1)"),
    ("method.daw.momentum", "1.5", "1.0", "in [0, 1]"),
    ("method.daw.alpha", "0", "0.01", "greater than 0"),
    ("method.daw.initial_threshold", "-0.01", "0", "in [0, 1]"),
    ("method.ddfp.start_iter", "-1", "0", "at least 0"),
    ("method.ddfp.eps", "-1", "0", "at least 0"),
    ("method.ddfp.blocks", "0", "1", "at least 1"),
    ("method.ddfp.hidden", "0", "1", "at least 1"),
    ("method.ddfp.clamp", "0", "0.1", "greater than 0"),
    ("method.ddfp.lr", "0", "1e-5", "greater than 0"),
    ("method.ddfp.final_lr_ratio", "0", "1", "in (0, 1]"),
    ("method.ddfp.grad_clip", "0", "1", "greater than 0"),
    ("method.ddfp.max_pixels", "0", "1", "at least 1"),
    ("method.ddfp.noise", "-0.1", "0", "at least 0"),
    ("method.ddfp.chunk_pixels", "0", "1", "at least 1"),
    ("optim.lr", "0", "1e-6", "greater than 0"),
    ("optim.lr", "-0.1", "1e-6", "greater than 0"),
    ("optim.weight_decay", "-1e-4", "0", "at least 0"),
    ("optim.momentum", "1", "0", "in [0, 1)"),
    ("optim.poly_power", "-0.9", "0", "at least 0"),
    ("optim.head_lr_multiplier", "0", "0.5", "greater than 0"),
    ("train.iterations", "0", "1", "at least 1"),
    ("train.ema_decay", "1.0", "0.0", "in [0, 1)"),
    ("train.ema_decay", "-0.1", "0.999", "in [0, 1)"),
    ("train.ohem_thresh", "1.1", "1.0", "in [0, 1]"),
    ("train.ohem_thresh", "-0.1", "0", "in [0, 1]"),
    ("train.ohem_min_kept", "-1", "0", "at least 0"),
    ("train.val_every", "0", "1", "at least 1"),
    ("train.log_every", "0", "1", "at least 1"),
    ("train.checkpoint_every", "0", "1", "at least 1"),
    ("train.inspect_every", "0", "1", "at least 1"),
    ("train.inspect_patches", "0", "1", "at least 1"),
    ("train.grad_clip", "0", "0.5", "greater than 0"),
    ("inference.overlap", "1", "0", "in [0, 1)"),
    ("inference.overlap", "-0.25", "0.75", "in [0, 1)"),
    ("inference.sw_batch_size", "0", "1", "at least 1"),
    ("inference.slab", "0", "1", "at least 1"),
]


@pytest.mark.parametrize("key, bad, good, allowed", RANGE_CASES, ids=[f"{c[0]}={c[1]}" for c in RANGE_CASES])
def test_numeric_keys_outside_their_range_are_refused(tmp_path, key, bad, good, allowed):
    path = write(tmp_path, minimal())
    with pytest.raises(MitosegError) as info:
        load_config(path, [f"{key}={bad}"])
    message = str(info.value)
    assert f"config key '{key}' must be {allowed}, got " in message, message
    assert "\n" not in message
    load_config(path, [f"{key}={good}"])


@pytest.mark.parametrize("overrides, needle", [
    (["model.channels=[16]", "model.strides=[]"], "'model.channels' must have at least 2 values"),
    (["model.channels=[16, 32, 64]", "model.strides=[2]"], "'model.strides' must have one value fewer"),
    (["model.channels=[0, 16]", "model.strides=[2]"], "'model.channels' values must be at least 1"),
    # A stride of 0 once reached the patch size check as a division by zero (a traceback).
    (["model.strides=[0, 2, 2]"], "'model.strides' values must be at least 1"),
    (["model.aspp_dilations=[6, 0, 18]"], "'model.aspp_dilations' values must be at least 1"),
    (["data.normalize.lower=50", "data.normalize.upper=50"], "'data.normalize.lower' must be less than"),
    (["data.strong.gamma=[0, 1.5]"], "'data.strong.gamma' must be [low, high] with 0 < low"),
    (["data.strong.gamma=[1.5, 0.7]"], "'data.strong.gamma' must be [low, high]"),
    (["data.strong.blur_sigma=[-0.1, 1]"], "'data.strong.blur_sigma' must be [low, high] with 0 <= low"),
    (["method.ddfp.betas=[0.5, 1.0]"], "'method.ddfp.betas' must be two values in [0, 1)"),
    (["data.label_map={255: 2}"], "'data.label_map' must map to class ids 0..1"),
    # A quarter turn of a 64 x 128 patch is 128 x 64: the batch would not stack.
    (["data.patch_size=[64, 128]"], "'data.augment.rot90' needs a square data.patch_size"),
])
def test_list_and_related_values_are_checked(tmp_path, overrides, needle):
    with pytest.raises(MitosegError) as info:
        load_config(write(tmp_path, minimal()), overrides)
    assert needle in str(info.value)


def test_non_square_patches_need_rot90_off(tmp_path):
    cfg = load_config(write(tmp_path, minimal()), ["data.patch_size=[64, 128]", "data.augment.rot90=false"])
    assert cfg.data.patch_size == [64, 128]


def test_label_map_may_map_to_the_ignore_index_of_the_ce_loss(tmp_path):
    path = write(tmp_path, minimal())
    cfg = load_config(path, ["data.label_map={255: 1, 7: 255}", "train.loss=ce", "train.ignore_index=255"])
    assert cfg.data.label_map == {255: 1, 7: 255}
    with pytest.raises(MitosegError, match="data.label_map"):
        load_config(path, ["data.label_map={7: 255}"])  # dice_ce ignores nothing


def field_names(section: str) -> set[str]:
    """The valid keys of a config level, e.g. "data.augment" (the top level: "")."""
    cls = Config
    for part in filter(None, section.split(".")):
        cls = typing.get_type_hints(cls)[part]
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("key", ["zzzz_top", "optim.zzzz", "data.augment.qqq"])
def test_unknown_key_always_gets_a_suggestion_even_unlike_any_valid_key(tmp_path, key):
    section = key.rpartition(".")[0]
    with pytest.raises(MitosegError) as info:
        load_config(write(tmp_path, minimal()), [f"{key}=1"])
    message = str(info.value)
    assert f"unknown config key '{key}'; did you mean '" in message, message
    suggestion = message.split("did you mean '", 1)[1].split("'", 1)[0]
    # A valid key of the same level, not of another one.
    prefix, _, name = suggestion.rpartition(".")
    assert prefix == section and name in field_names(section), suggestion


def natural_config(**train):
    return {"data": {"kind": "pascal", "root": "voc", "split": "92", "num_classes": 21},
            "model": {"in_channels": 3}, **({"train": train} if train else {})}


def test_natural_images_refuse_dice_ce_and_default_to_ce():
    with pytest.raises(MitosegError) as info:
        config_from_dict(natural_config(loss="dice_ce"))
    message = str(info.value)
    assert "'train.loss' must be 'ce' or 'ohem' for data.kind 'pascal'" in message and "ignore_index: 255" in message
    assert config_from_dict(natural_config()).train.loss == "ce"
    assert config_from_dict(natural_config(iterations=5)).train.loss == "ce"
    assert config_from_dict(natural_config(loss="ce")).train.loss == "ce"
    with pytest.raises(MitosegError, match="'train.ignore_index' must be 255 for data.kind 'pascal'"):
        config_from_dict(natural_config(loss="ce", ignore_index=0))
    # EM keeps dice_ce as its default.
    assert config_from_dict(minimal()).train.loss == "dice_ce"


def test_ohem_is_an_ignore_aware_loss_for_natural_images_only():
    cfg = config_from_dict(natural_config(loss="ohem"))
    assert (cfg.train.loss, cfg.train.ohem_thresh, cfg.train.ohem_min_kept) == ("ohem", 0.7, 200000)
    cfg = config_from_dict(natural_config(loss="ohem", ohem_thresh=0.5, ohem_min_kept=1000))
    assert (cfg.train.ohem_thresh, cfg.train.ohem_min_kept) == (0.5, 1000)
    with pytest.raises(MitosegError, match="'train.ignore_index' must be 255"):
        config_from_dict(natural_config(loss="ohem", ignore_index=0))
    with pytest.raises(MitosegError) as info:
        config_from_dict({**minimal(), "train": {"loss": "ohem"}})
    assert "config key 'train.loss' ohem is for natural images" in str(info.value)
    assert "\n" not in str(info.value)


def deeplab_config(model=None, method=None):
    cfg = natural_config()
    cfg["model"] = {"in_channels": 3, "name": "deeplabv3plus", **(model or {})}
    if method is not None:
        cfg["method"] = method
    return cfg


def test_fp_placement_defaults_to_the_backbone_for_deeplab_and_to_the_head_input_for_unet():
    for name in ("unimatch", "daw", "fixmatch", "supervised", "daw_ddfp"):
        assert config_from_dict(deeplab_config(method={"name": name})).method.fp_placement == "backbone"
    assert config_from_dict(deeplab_config()).method.fp_placement == "backbone"  # no method section
    explicit = deeplab_config(method={"name": "unimatch", "fp_placement": "head_input"})
    assert config_from_dict(explicit).method.fp_placement == "head_input"
    unet = {**minimal(), "method": {"name": "unimatch"}}
    assert config_from_dict(unet).method.fp_placement == "head_input"
    for bad in ({**minimal(), "method": {"name": "unimatch", "fp_placement": "backbone"}},
                {**minimal(), "method": {"name": "daw_ddfp", "fp_placement": "backbone"}}):
        with pytest.raises(MitosegError) as info:
            config_from_dict(bad)
        assert "config key 'method.fp_placement' backbone" in str(info.value) and "\n" not in str(info.value)


def test_decoder_is_a_deeplab_option_and_u2pl_needs_the_low_level_channels_plus_more():
    cfg = config_from_dict(deeplab_config({"decoder": "u2pl", "feature_channels": 304, "head_channels": 256}))
    assert cfg.model.decoder == "u2pl"
    assert config_from_dict(deeplab_config()).model.decoder == "unimatch"
    with pytest.raises(MitosegError) as info:
        config_from_dict({**minimal(), "model": {"decoder": "u2pl"}})
    assert "config key 'model.decoder' is a deeplabv3plus option" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(MitosegError, match="'model.feature_channels' must be more than 48 for model.decoder u2pl"):
        config_from_dict(deeplab_config({"decoder": "u2pl", "feature_channels": 48}))


def test_ddfp_defaults_to_the_mean_teacher_and_other_methods_to_the_students_train_forward():
    from mitoseg.config import config_from_dict

    base = {"data": {"train": {"image": "a.tif", "label": "b.tif"}}}
    assert config_from_dict({**base, "method": {"name": "ddfp"}}).method.pseudo_labels == "teacher"
    assert config_from_dict({**base, "method": {"name": "daw_ddfp"}}).method.pseudo_labels == "student_train"
    assert config_from_dict({**base, "method": {"name": "daw"}}).method.pseudo_labels == "student_train"
    explicit = {**base, "method": {"name": "ddfp", "pseudo_labels": "student"}}
    assert config_from_dict(explicit).method.pseudo_labels == "student"
