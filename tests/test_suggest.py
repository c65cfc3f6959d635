"""mitoseg suggest: the scores of a slice (pure functions), the greedy choice with its diversity term, and the
command end to end on a trained tiny model whose uncertainty is known (one slice made unlike anything it saw)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile
import torch

from conftest import assert_one_line_error, run_cli
from mitoseg.suggest import Band, SliceScores, choose, combined_value, slab_scores

BAND = Band(0.6, 0.95, "test")


def two_class(foreground: torch.Tensor) -> torch.Tensor:
    return torch.stack([1 - foreground, foreground], 1)


def test_slab_scores_count_the_uncertain_band_entropy_and_view_disagreement():
    n, size = 3, 16
    sure = torch.full((n, size, size), 0.001)
    sure[:, :8] = 0.999  # half the slice: confident foreground
    views = two_class(sure)[None].repeat(2, 1, 1, 1, 1)  # (V, n, K, y, x): two identical views
    views[:, 1, 1, :8] = 0.2  # slice 1: its foreground at confidence 0.8, inside the band
    views[0, 2, 1, :8], views[1, 2, 1, :8] = 0.7, 0.99  # slice 2: the two views disagree
    views[:, :, 0] = 1 - views[:, :, 1]
    images = torch.randn(n, size, size)
    scores = slab_scores(views, images, BAND)
    assert scores["uncertain"].tolist() == [0, 8 * size, 8 * size]  # slice 2's mean is 0.845: in the band too
    assert scores["candidate"].tolist() == [8 * size] * 3
    assert scores["entropy"][1] > scores["entropy"][0] and scores["entropy"][2] > scores["entropy"][0]
    assert scores["disagreement"][0] == 0 and scores["disagreement"][1] == 0
    assert scores["disagreement"][2] == pytest.approx(0.145 * 0.5, rel=1e-4)  # |0.7 - 0.845| on half the slice
    assert scores["map"].shape == (n, size, size) and scores["profile"].shape[0] == n


def scores_of(values):
    return [SliceScores(index=i, uncertain_pixels=u, candidate_pixels=100, entropy=e, disagreement=d,
                        foreground=0.1, profile=np.zeros(3)) for i, (u, e, d) in enumerate(values)]


def test_combined_value_ranks_each_score_and_averages():
    value = combined_value(scores_of([(10, 0.1, 0.01), (30, 0.3, 0.03), (20, 0.2, 0.02)]))
    np.testing.assert_allclose(value, [0.0, 1.0, 0.5])


def test_choice_never_takes_neighbours_and_prefers_slices_far_from_the_labeled():
    indices = np.arange(40)
    value = np.ones(40)
    value[[20, 21, 22]] = 2.0  # three neighbours share the top value
    profile = np.random.default_rng(0).normal(size=(40, 4))
    chosen, _ = choose(indices, value, profile, labeled=[5], n=3, num_slices=40, min_gap=2)
    picked = sorted(indices[chosen])
    assert len(picked) == 3 and all(b - a >= 2 for a, b in zip(picked, picked[1:]))
    assert all(abs(p - 5) >= 2 for p in picked)
    # Every slice equal but the z term: the first choice is the farthest from the labeled slice.
    first, _ = choose(indices, np.ones(40), np.zeros((40, 4)), labeled=[0], n=1, num_slices=40)
    assert indices[first[0]] >= 10
    # Nothing allowed: fewer suggestions, no error.
    assert choose(np.array([3, 4]), np.ones(2), np.zeros((2, 2)), labeled=[3, 4], n=2, num_slices=10)[0] == []


class IntensityModel(torch.nn.Module):
    """A model whose uncertainty is known: foreground logit = 20 x (intensity - the window's median), so it is
    sure where a slice has contrast and unsure (probability 0.5) where the contrast is gone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        middle = x[:, x.shape[1] // 2: x.shape[1] // 2 + 1].float()
        centred = middle - middle.flatten(1).median(1).values.view(-1, 1, 1, 1)
        return torch.cat([-10.0 * centred, 10.0 * centred], 1)


@pytest.fixture
def known_model(tmp_path, tiny_volumes, monkeypatch):
    """A real checkpoint file (the command checks it) whose network is replaced by :class:`IntensityModel`."""
    from conftest import train_tiny_run
    from mitoseg.inference import session

    checkpoint = train_tiny_run(tmp_path, tiny_volumes) / "last.pt"
    loaded = session.load_model(checkpoint, device="cpu")
    loaded.model = IntensityModel().eval()
    monkeypatch.setattr(session.Segmenter, "from_file", classmethod(lambda cls, *a, **k: cls(loaded)))
    return checkpoint


@pytest.mark.slow
def test_suggest_ranks_the_slice_the_model_is_unsure_of_first_and_writes_every_slice_once(
        known_model, tiny_volumes, tmp_path, capsys):
    image = tifffile.imread(tiny_volumes["train_image"]).astype(np.float32)
    volume = np.concatenate([image, image[::-1]])  # 16 slices
    altered = 9
    volume[altered] = volume[altered].mean() + 0.05 * (volume[altered] - volume[altered].mean())  # contrast gone
    tifffile.imwrite(tmp_path / "vol.tif", volume)
    code, out, err = run_cli(["suggest", "--checkpoint", known_model, "--image", tmp_path / "vol.tif", "--labeled",
                              "0,15", "-n", "3", "--csv", tmp_path / "s.csv", "--map", tmp_path / "map.tif",
                              "--no-progress"], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line[:2] in ("1.", "2.", "3.")]
    assert lines[0].startswith(f"1. slice {altered}:"), out
    with open(tmp_path / "s.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(int(r["slice"]) for r in rows) == list(range(1, 15))  # every unlabeled slice once
    ranked = sorted((int(r["rank"]), int(r["slice"])) for r in rows if r["rank"])
    picked = sorted(s for _, s in ranked)
    assert len(ranked) == 3 and all(b - a >= 2 for a, b in zip(picked, picked[1:]))  # never neighbours
    uncertainty = tifffile.imread(tmp_path / "map.tif")
    assert uncertainty.shape == volume.shape and uncertainty.dtype == np.float32
    assert uncertainty[0].max() == 0 and uncertainty[altered].mean() > 2 * uncertainty[altered + 2].mean()


def test_suggest_refuses_bad_input_in_one_line_before_loading_a_model(tmp_path, capsys, tiny_volumes):
    missing = tmp_path / "missing.pt"
    code, _, err = run_cli(["suggest", "--checkpoint", missing, "--image", tiny_volumes["val_image"]], capsys)
    assert_one_line_error(code, err, "missing.pt")
    (tmp_path / "s.csv").write_text("x")
    model = tmp_path / "model.pt"
    torch.save({"x": 1}, model)
    code, _, err = run_cli(["suggest", "--checkpoint", model, "--image", tiny_volumes["val_image"], "--csv",
                            tmp_path / "s.csv"], capsys)
    assert_one_line_error(code, err, "s.csv", "--overwrite")
    code, _, err = run_cli(["suggest", "--checkpoint", model, "--image", tiny_volumes["val_image"], "-n", "0"], capsys)
    assert_one_line_error(code, err, "-n")
    code, _, err = run_cli(["suggest", "--checkpoint", model, "--image", tiny_volumes["val_image"], "--labeled",
                            "99"], capsys)
    assert_one_line_error(code, err, "99")
