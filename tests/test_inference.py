"""Prediction: test-time augmentation, 2.5-D context in predict, mixed precision choice, schedules and losses."""

import math

import numpy as np
import pytest
import tifffile
import torch

from mitoseg.config import config_from_dict, input_channels
from mitoseg.data.readers import SliceReader, context_indices
from mitoseg.data.transforms import Normalization
from mitoseg.device import amp_dtype
from mitoseg.inference import VolumePredictor, predict_with_tta, tta_transforms


def inference_config(**inference):
    return config_from_dict({"data": {"train": {"image": "x"}}, "train": {"amp": False},
                             "inference": {"roi_size": [32, 32], "overlap": 0.5, "sw_batch_size": 2, **inference}})


class Pointwise(torch.nn.Module):
    """A 1x1 convolution: equivariant to every flip and quarter turn by construction."""

    spatial_dims = 2

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 2, 1)

    def forward(self, x):
        return self.conv(x)


class Oriented(torch.nn.Module):
    """3x3 convolutions with random weights: not equivariant to flips or turns."""

    spatial_dims = 2

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(),
                                       torch.nn.Conv2d(4, 2, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def test_the_tta_group_is_the_eight_flips_and_turns_and_each_inverse_undoes_its_transform():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 4 + 1)[..., :4]
    transforms = tta_transforms(2)
    assert len(transforms) == 8 and len(tta_transforms(3)) == 16
    images = {tuple(t.forward(x).flatten().tolist()) for t in transforms}
    assert len(images) == 8  # eight different images of a generic square
    for t in transforms + tta_transforms(3):
        volume = torch.randn(1, 2, 3, 5, 5)
        assert torch.equal(t.inverse(t.forward(volume)), volume), t.name


def test_tta_of_an_equivariant_model_equals_no_tta():
    image = torch.randn(3, 1, 64, 64)
    plain = VolumePredictor(Pointwise(), inference_config(tta=False), torch.device("cpu")).probabilities(image)
    tta = VolumePredictor(Pointwise(), inference_config(tta=True), torch.device("cpu")).probabilities(image)
    torch.testing.assert_close(tta, plain, atol=1e-6, rtol=0)


def test_tta_output_is_invariant_to_flipping_and_turning_the_input():
    # 64 x 64 with 32 x 32 windows at overlap 0.5: the window grid maps onto itself under the group.
    predictor = VolumePredictor(Oriented(), inference_config(tta=True), torch.device("cpu"))
    plain = VolumePredictor(Oriented(), inference_config(tta=False), torch.device("cpu"))
    image = torch.randn(2, 1, 64, 64)
    reference = predictor.probabilities(image)
    for flip_dims, turns in (((-1,), 0), ((-2,), 0), ((), 1), ((-1,), 3)):
        moved = torch.rot90(image.flip(flip_dims) if flip_dims else image, turns, dims=(-2, -1))
        expected = torch.rot90(reference.flip(flip_dims) if flip_dims else reference, turns, dims=(-2, -1))
        torch.testing.assert_close(predictor.probabilities(moved), expected, atol=1e-5, rtol=0)
        # Without TTA this model is not invariant: the check above can fail.
        assert not torch.allclose(plain.probabilities(moved),
                                  torch.rot90(plain.probabilities(image).flip(flip_dims) if flip_dims else
                                              plain.probabilities(image), turns, dims=(-2, -1)), atol=1e-3)
    # TTA is the mean over the group.
    manual = torch.stack([t.inverse(torch.softmax(Oriented()(t.forward(image)), 1)) for t in tta_transforms(2)])
    torch.testing.assert_close(predict_with_tta(lambda x: torch.softmax(Oriented()(x), 1), image),
                               manual.mean(0), atol=1e-6, rtol=0)


def test_context_indices_reflect_at_the_ends_of_the_volume():
    assert context_indices([0, 1, 4], 2, 5).tolist() == [[2, 1, 0, 1, 2], [1, 0, 1, 2, 3], [2, 3, 4, 3, 2]]
    assert context_indices([0], 1, 1).tolist() == [[0, 0, 0]]
    volume = np.arange(6, dtype=np.uint8)[:, None, None] * np.ones((6, 2, 2), np.uint8)

    class Stack:
        def __len__(self):
            return 6

        def read_slices(self, indices):
            return volume[list(indices)]

        def read(self, start, stop):
            return volume[start:stop]

    reader = SliceReader(Stack(), [0, 3, 5], context=1)
    assert reader.read(0, 3)[:, :, 0, 0].tolist() == [[1, 0, 1], [2, 3, 4], [4, 5, 4]]
    assert SliceReader(Stack(), [2, 3]).read(0, 2)[:, 0, 0].tolist() == [2, 3]


class Recorder(torch.nn.Module):
    """Records what the network is given; predicts foreground where the first channel is brighter than the last."""

    spatial_dims = 2

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return torch.stack([x[:, -1], x[:, 0]], dim=1)


def test_predict_feeds_each_slice_with_its_neighbours_including_the_edge_slices():
    cfg = config_from_dict({"data": {"train": {"image": "x"}, "context_slices": 2}, "train": {"amp": False},
                            "inference": {"roi_size": [16, 16], "slab": 3}})
    assert input_channels(cfg) == 5
    volume = (np.arange(7, dtype=np.float32) * 10)[:, None, None] * np.ones((7, 16, 16), np.float32)
    recorder = Recorder()
    predictor = VolumePredictor(recorder, cfg, torch.device("cpu"))
    reader = SliceReader(_Array(volume), context=2)
    probs = torch.cat([p for _, _, p in predictor.slabs(reader.read, 7, Normalization(0.0, 10.0))])
    seen = torch.cat(recorder.inputs)[:, :, 0, 0]  # (slices, 5 channels): slice numbers after normalization
    assert seen.tolist() == context_indices(range(7), 2, 7).astype(float).tolist()
    # Foreground where the slice two before is brighter than the slice two after: nowhere in this ramp
    # (equal at the reflected last slice, which a wrong reflection would break).
    assert probs.argmax(1)[:, 0, 0].tolist() == [0, 0, 0, 0, 0, 0, 0]


class _Array:
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def read(self, start, stop):
        return self.data[start:stop]

    def read_slices(self, indices):
        return self.data[list(indices)]


def test_training_patches_carry_the_neighbouring_slices_of_the_volume(tmp_path):
    from mitoseg.engine.trainer import Trainer

    image = (np.arange(8, dtype=np.uint8) * 20)[:, None, None] * np.ones((8, 32, 32), np.uint8)
    label = np.zeros((8, 32, 32), np.uint8)
    label[:, 8:20, 8:20] = 1
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "label.tif", label)
    cfg = config_from_dict({
        "data": {"train": {"image": str(tmp_path / "image.tif"), "label": str(tmp_path / "label.tif"),
                           "slices": [0, 4, 7]},
                 "context_slices": 1, "patch_size": [16, 16], "batch_size": 6,
                 "normalize": {"mode": "meanstd"},
                 "augment": {"intensity_scale": 0.0, "intensity_shift": 0.0, "noise_std": 0.0}},
        "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0, "feature_channels": 4,
                  "head_channels": 4},
        "train": {"iterations": 2}, "inference": {"roi_size": [16, 16]}})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels == 3
    labeled, _ = next(trainer.batches(0))
    assert labeled["image"].shape == (6, 3, 16, 16)
    norm = trainer.data.labeled.sources[0].normalization
    raw = labeled["image"][:, :, 0, 0] * norm.scale + norm.offset  # back to raw intensities
    slices = {tuple(int(round(v)) // 20 for v in row) for row in raw.tolist()}
    assert slices <= {(1, 0, 1), (3, 4, 5), (6, 7, 6)}  # slices 0 and 7 reflected at the volume's ends
    assert len(slices) >= 2
    trainer.fit()  # and it trains and validates on those stacks


def test_mixed_precision_is_bfloat16_only_on_a_cpu_with_native_bf16(monkeypatch):
    import mitoseg.device as precision

    assert amp_dtype(torch.device("cpu"), False) is None
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert amp_dtype(torch.device("cpu"), True) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert amp_dtype(torch.device("cpu"), True) is None
    assert amp_dtype(torch.device("cuda"), True) == torch.float16


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_learning_rate_warms_up_linearly_then_decays_to_zero(schedule):
    from mitoseg.engine.trainer import lr_factor

    cfg = config_from_dict({"data": {"train": {"image": "x"}}, "train": {"iterations": 100},
                            "optim": {"schedule": schedule, "warmup_iters": 10, "warmup_ratio": 0.1}})
    factors = [lr_factor(i, 100, cfg.optim) for i in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[5] == pytest.approx(0.55)
    assert factors[10] == pytest.approx((1 - 0.1) ** 0.9 if schedule == "poly" else 0.5 * (1 + math.cos(0.1 * math.pi)))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[100] == pytest.approx(0.0, abs=1e-12)
    no_warmup = config_from_dict({"data": {"train": {"image": "x"}}, "optim": {"schedule": schedule}}).optim
    assert lr_factor(0, 100, no_warmup) == 1.0


def test_dice_and_cross_entropy_weights():
    from mitoseg.losses import make_supervised_loss

    logits = torch.randn(2, 2, 8, 8)
    label = torch.randint(0, 2, (2, 8, 8))

    def loss(dice, ce):
        cfg = config_from_dict({"data": {"train": {"image": "x"}}, "train": {"dice_weight": dice, "ce_weight": ce}})
        return make_supervised_loss(cfg.train)(logits, label)

    ce = torch.nn.functional.cross_entropy(logits, label)
    assert loss(0.0, 1.0).item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss(1.0, 1.0).item() == pytest.approx(loss(1.0, 0.0).item() + ce.item(), rel=1e-5)
    assert loss(0.5, 2.0).item() == pytest.approx(0.5 * loss(1.0, 0.0).item() + 2 * ce.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["daw", "daw_ddfp"])
def test_semi_supervised_methods_train_on_2_5d_stacks(tmp_path, tiny_volumes, method):
    from conftest import tiny_config_dict

    from mitoseg.engine.trainer import Trainer

    cfg = tiny_config_dict(tiny_volumes, iterations=2, inspect_every=2)
    cfg["data"].update({"context_slices": 1, "train": {**cfg["data"]["train"], "slices": "0:3"},
                        "augment": {"missing_slice_prob": 0.5, "misalign_prob": 0.5}})
    cfg["method"] = {"name": method, "ddfp": {"start_iter": 0, "hidden": 8, "max_pixels": 256}}
    trainer = Trainer(config_from_dict(cfg), tmp_path / "run", progress=False)
    _, unlabeled = next(trainer.batches(0))
    assert unlabeled["weak"].shape[1] == unlabeled["strong1"].shape[1] == 3
    summary = trainer.fit()
    assert summary["completed"] and 0.0 <= summary["final"]["fg_iou"] <= 1.0
    arrays = np.load(tmp_path / "run" / "inspect" / "iter_000002.npz")
    assert arrays["image"].shape == (4, 32, 32)  # the centre slice of each stack
