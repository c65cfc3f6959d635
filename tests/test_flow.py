"""DDFP's density model: the flow, its mixture prior and the density-descending perturbation."""

import io
import math

import numpy as np
import pytest
import torch

from mitoseg.networks.base import SegmentationHead
from mitoseg.semi.flow import (
    EXCLUDED,
    UNLABELED,
    DensityModel,
    FlowTrainer,
    build_flow,
    density_descending_perturbation,
    flatten_pixels,
    labels_to_grid,
    mixture_component_log_density,
    mixture_component_log_density_reference,
    mixture_log_density,
    prior_log_density,
    sample_pixels,
    subsample_mask,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These tests are many small tensor operations: a second thread only adds synchronisation, and on a
    busy machine (a CI runner, other jobs) waiting for it can make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_density(dim=4, classes=3, seed=0):
    """A flow with random (not identity) couplings, in float64."""
    return DensityModel(dim, classes, blocks=2, hidden=16, clamp=2.0, seed=seed, init="default").double()


def test_flow_is_invertible_and_its_log_determinant_matches_the_autograd_jacobian():
    model = random_density(dim=4)
    x = torch.randn(6, 4, dtype=torch.float64)
    z, log_jac = model.flow(x)
    assert not torch.allclose(z, x)  # not the identity
    torch.testing.assert_close(model.inverse(z), x)
    # Rows are independent, so the Jacobian of the summed output w.r.t. x holds each row's Jacobian.
    jac = torch.autograd.functional.jacobian(lambda v: model.flow(v)[0].sum(0), x)  # (D, N, D)
    expected = torch.linalg.slogdet(jac.permute(1, 0, 2))[1]
    torch.testing.assert_close(log_jac, expected)


def test_vectorised_mixture_log_density_equals_the_naive_formula_with_gradients():
    z = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    means = (3 * torch.randn(5, 16, dtype=torch.float64)).requires_grad_()
    fast = mixture_component_log_density(z, means)
    naive = mixture_component_log_density_reference(z, means)
    by_hand = -0.5 * ((z[:, None] - means[None]) ** 2).sum(-1) - 8 * math.log(2 * math.pi)
    torch.testing.assert_close(fast, naive)
    torch.testing.assert_close(fast, by_hand)
    weights = torch.randn(50, 5, dtype=torch.float64)
    grads_fast = torch.autograd.grad((fast * weights).sum(), (z, means))
    grads_naive = torch.autograd.grad((naive * weights).sum(), (z, means))
    for a, b in zip(grads_fast, grads_naive):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(mixture_component_log_density, (z[:6], means))


def test_prior_scores_labeled_rows_by_their_class_and_unlabeled_rows_by_the_mixture():
    component = torch.log(torch.tensor([[0.1, 0.3], [0.2, 0.2], [0.5, 0.1]], dtype=torch.float64))
    labels = torch.tensor([1, UNLABELED, 0])
    prior = prior_log_density(component, labels)
    torch.testing.assert_close(prior, torch.log(torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64)))
    torch.testing.assert_close(mixture_log_density(component),
                               torch.log(torch.tensor([0.2, 0.2, 0.3], dtype=torch.float64)))


def two_moons(n, generator):
    """Two interleaved half circles (classes 0 and 1) with a little noise."""
    label = torch.randint(0, 2, (n,), generator=generator)
    angle = torch.rand(n, generator=generator) * math.pi
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], 1)
    points = torch.where(label[:, None] == 0, upper, lower) + 0.08 * torch.randn(n, 2, generator=generator)
    return (points - torch.tensor([0.5, 0.25])) * 2.0, label


@pytest.mark.parametrize("init, drop", [("identity", 0.5), ("official", 0.3)])
def test_flow_trained_on_a_2d_toy_mixture_lowers_its_nll_and_its_components_classify_the_points(init, drop):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = DensityModel(2, 2, blocks=2, hidden=64, seed=0, init=init)
    steps = 250
    trainer = FlowTrainer(model, lr=1e-2, total_steps=steps, noise=0.0, max_pixels=512)
    nll = []
    for _ in range(steps):
        points, label = two_moons(512, generator)
        label = torch.where(torch.rand(512, generator=generator) < 0.5, label, torch.full_like(label, UNLABELED))
        nll.append(trainer.step(points, label)["flow_nll_bpd"].item())
    assert np.mean(nll[-20:]) < np.mean(nll[:20]) - drop
    points, label = two_moons(2000, generator)
    with torch.no_grad():
        accuracy = (model.class_logits(points).argmax(1) == label).float().mean().item()
    assert accuracy > 0.9
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.01)


def test_perturbation_has_norm_eps_per_pixel_and_a_small_step_lowers_the_log_density():
    torch.manual_seed(0)
    model = random_density(dim=6, classes=2).float()
    head = SegmentationHead(5, 6, 2).eval()
    features = torch.randn(2, 5, 8, 8)

    def total_log_density(f):
        return model.log_density(flatten_pixels(head.penultimate(f))).sum()

    delta = density_descending_perturbation(features, head.penultimate, model.log_density, eps=0.7)
    assert not delta.requires_grad
    assert all(p.grad is None for p in list(model.parameters()) + list(head.parameters()))
    torch.testing.assert_close(delta.norm(dim=1), torch.full((2, 8, 8), 0.7))
    chunked = density_descending_perturbation(features, head.penultimate, model.log_density, eps=0.7, chunk=37)
    torch.testing.assert_close(chunked, delta)  # blocks of pixels give the same perturbation
    with torch.no_grad():
        before = total_log_density(features)
        assert total_log_density(features + 1e-2 * delta) < before
        assert total_log_density(features - 1e-2 * delta) > before  # and the other way raises it


def test_sample_pixels_caps_the_count_and_skips_excluded_pixels_while_others_remain():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, UNLABELED, EXCLUDED, EXCLUDED, UNLABELED, 1, EXCLUDED] * 10)
    features = torch.arange(80, dtype=torch.float32)[:, None].repeat(1, 3)
    x, picked, valid = sample_pixels(features, labels, max_pixels=40)
    assert x.shape == (40, 3) and valid.all() and (picked != EXCLUDED).all()
    torch.testing.assert_close(labels[x[:, 0].long()], picked)
    assert len(set(x[:, 0].tolist())) == 40  # without replacement
    x, picked, valid = sample_pixels(features, labels, max_pixels=1000)
    assert x.shape == (80, 3) and valid.sum() == 50 and torch.equal(valid, picked != EXCLUDED)


def test_subsample_mask_keeps_at_most_the_count_of_the_masked_pixels_at_random():
    torch.manual_seed(0)
    mask = torch.rand(2, 16, 16) < 0.3
    kept = subsample_mask(mask, 20)
    assert kept.shape == mask.shape and int(kept.sum()) == 20 and not (kept & ~mask).any()
    assert not torch.equal(kept, subsample_mask(mask, 20))  # drawn afresh each call
    assert torch.equal(subsample_mask(mask, 10_000), mask)  # fewer masked pixels than the count: all kept
    few = torch.zeros(2, 16, 16, dtype=torch.bool)
    few[0, 3, 4] = few[1, 5, 6] = True
    assert torch.equal(subsample_mask(few, 20), few)


def test_perturbation_direction_from_sampled_pixels_points_toward_lower_density_of_those_pixels():
    # perturb_max_pixels: the NLL of a random subset of the used pixels pulls the direction; every pixel of the
    # head's input still moves (3x3 convolution and BatchNorm in train mode tie it to the sampled ones).
    torch.manual_seed(0)
    model = random_density(dim=6, classes=2).float()
    head = SegmentationHead(5, 6, 2).train()
    features = torch.randn(2, 5, 12, 12)
    mask = subsample_mask(torch.ones(2, 12, 12, dtype=torch.bool), 40)
    delta = density_descending_perturbation(features, head.penultimate, model.log_density, eps=0.5, mask=mask)
    torch.testing.assert_close(delta.norm(dim=1), torch.full((2, 12, 12), 0.5))

    def sampled_log_density(f):
        return model.log_density(flatten_pixels(head.penultimate(f)))[mask.reshape(-1)].sum()

    with torch.no_grad():
        assert sampled_log_density(features + 1e-2 * delta) < sampled_log_density(features)


def test_a_bfloat16_flow_runs_its_matrix_products_in_bfloat16_and_stays_close_to_float32():
    torch.manual_seed(0)
    exact = DensityModel(32, 2, blocks=2, hidden=64, seed=3)
    fast = DensityModel(32, 2, blocks=2, hidden=64, seed=3, precision="bfloat16")
    assert fast.state_dict().keys() == exact.state_dict().keys()  # one checkpoint format for both
    fast.load_state_dict(exact.state_dict())
    x = torch.randn(512, 32)
    z_dtypes = []
    hook = fast.flow.module_list[0].subnet1[0].register_forward_hook(lambda m, a, out: z_dtypes.append(out.dtype))
    log_p, reference = fast.log_density(x), exact.log_density(x)
    hook.remove()
    assert z_dtypes == [torch.bfloat16] and log_p.dtype == torch.float32
    assert (log_p - reference).abs().max() < 0.02 * reference.abs().max()
    grad = torch.autograd.grad(fast.log_density(x.requires_grad_(True)).sum(), x)[0]
    reference_grad = torch.autograd.grad(exact.log_density(x).sum(), x)[0]
    cosine = torch.nn.functional.cosine_similarity(grad, reference_grad, dim=1)
    assert grad.dtype == torch.float32 and cosine.min() > 0.95  # the perturbation's direction per pixel
    with pytest.raises(ValueError, match="precision"):
        DensityModel(4, 2, precision="float16")


def test_labels_are_nearest_downsampled_to_the_feature_grid_and_ignored_pixels_excluded():
    label = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 1, 1], [255, 255, 0, 0]]])
    grid = labels_to_grid(label, (2, 2), ignore_index=255)
    assert grid.tolist() == [[[0, 1], [EXCLUDED, 1]]]
    assert labels_to_grid(label, (4, 4)).tolist() == label.tolist()


def test_building_the_flow_leaves_the_global_random_states_alone():
    np.random.seed(3)
    torch.manual_seed(3)
    numpy_before, torch_before = np.random.get_state()[1].copy(), torch.get_rng_state()
    a = DensityModel(8, 2, seed=5)
    assert np.array_equal(np.random.get_state()[1], numpy_before)
    assert torch.equal(torch.get_rng_state(), torch_before)
    b = DensityModel(8, 2, seed=5)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    perms = [m.perm for m in build_flow(8, blocks=2, seed=0) if hasattr(m, "perm")]
    assert len(perms) == 2 and not torch.equal(perms[0], perms[1])


def test_flow_trainer_state_round_trips_through_a_weights_only_file_and_continues_identically():
    torch.manual_seed(0)
    features, labels = torch.randn(300, 4), torch.randint(-2, 3, (300,))
    first = FlowTrainer(DensityModel(4, 3, hidden=16, seed=0), total_steps=10, max_pixels=128)
    for _ in range(3):
        first.step(features, labels)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = FlowTrainer(DensityModel(4, 3, hidden=16, seed=1), total_steps=10, max_pixels=128)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    state = torch.get_rng_state()
    logs_a = first.step(features, labels)
    torch.set_rng_state(state)
    logs_b = second.step(features, labels)
    assert logs_a["flow_nll_bpd"].item() == logs_b["flow_nll_bpd"].item()
    for (name, p), q in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert first.optimizer.param_groups[0]["lr"] == second.optimizer.param_groups[0]["lr"] < 1e-3
