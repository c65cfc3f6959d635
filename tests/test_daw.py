"""DAW mathematics: the threshold, the running statistics and distribution alignment."""

import math

import pytest
import torch

from mitoseg.semi.daw import (
    DAWState,
    align_distribution,
    class_mean_confidence,
    correct_and_wrong,
    gaussian_crossing,
    masked_mean_var,
)


def confidence_sets(probs, target, ignore_index=None):
    confidence, prediction = probs.max(dim=1)
    return (confidence, *correct_and_wrong(prediction, target, ignore_index))


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def normal_pdf(x, mu, sigma):
    return math.exp(-((x - mu) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))


def test_equal_variances_give_the_midpoint_without_dividing_by_zero():
    tau = gaussian_crossing(t(0.9), t(0.1), t(0.5), t(0.1))
    assert torch.isfinite(tau)
    assert tau.item() == pytest.approx(0.7, abs=1e-9)
    # Nearly equal variances stay continuous with the equal case.
    near = gaussian_crossing(t(0.9), t(0.1 + 1e-9), t(0.5), t(0.1))
    assert near.item() == pytest.approx(0.7, abs=1e-6)


@pytest.mark.parametrize("sigma_pos,sigma_neg", [(0.05, 0.15), (0.2, 0.1)])
def test_the_crossing_is_where_the_densities_meet_and_positives_win_above_it(sigma_pos, sigma_neg):
    mu_pos, mu_neg, alpha = 0.92, 0.6, 1.0
    tau = gaussian_crossing(t(mu_pos), t(sigma_pos), t(mu_neg), t(sigma_neg), alpha).item()
    assert mu_neg < tau < mu_pos
    assert normal_pdf(tau, mu_pos, sigma_pos) == pytest.approx(alpha * normal_pdf(tau, mu_neg, sigma_neg), rel=1e-6)
    assert normal_pdf(tau + 0.01, mu_pos, sigma_pos) > normal_pdf(tau + 0.01, mu_neg, sigma_neg)
    assert normal_pdf(tau - 0.01, mu_pos, sigma_pos) < normal_pdf(tau - 0.01, mu_neg, sigma_neg)


def test_a_larger_prior_of_wrong_pseudo_labels_raises_the_threshold():
    args = (t(0.9), t(0.08), t(0.6), t(0.12))
    taus = [gaussian_crossing(*args, alpha=a).item() for a in (0.5, 1.0, 2.0, 4.0)]
    assert taus == sorted(taus) and taus[0] < taus[-1]


def test_no_real_root_keeps_the_previous_threshold():
    # Far-apart variances with close means: N+ lies under N- everywhere.
    assert torch.isnan(gaussian_crossing(t(0.6), t(0.01), t(0.6), t(0.3), alpha=50.0))
    # momentum 1: the running statistics stay where they are set, whatever the batch.
    state = DAWState(num_classes=2, momentum=1.0, alpha=50.0)
    state.mean = torch.tensor([0.6, 0.6])
    state.var = torch.tensor([0.01**2, 0.3**2])
    state.threshold = torch.tensor(0.77)
    probs = torch.softmax(torch.randn(1, 2, 8, 8), 1)
    state.update(probs, torch.randint(0, 2, (1, 8, 8)))
    assert state.threshold.item() == pytest.approx(0.77)
    # With a crossing, the same update moves it.
    state.alpha = 1.0
    state.update(probs, torch.randint(0, 2, (1, 8, 8)))
    assert state.threshold.item() != pytest.approx(0.77)


def test_statistics_start_at_one_over_k_and_one_half_and_move_by_the_momentum():
    k = 4
    state = DAWState(num_classes=k, momentum=0.99)
    assert torch.allclose(state.mean, torch.full((2,), 1 / k))
    assert torch.allclose(state.var, torch.full((2,), 0.5))
    assert state.threshold.item() == pytest.approx(0.95)
    torch.manual_seed(0)
    logits = torch.randn(2, k, 16, 16) * 3
    probs = logits.softmax(1)
    target = torch.randint(0, k, (2, 16, 16))
    confidence, positive, negative = confidence_sets(probs, target)
    pos, neg = confidence[positive], confidence[negative]
    state.update(probs, target)
    assert state.mean[0].item() == pytest.approx(0.99 / k + 0.01 * pos.mean().item(), rel=1e-5)
    assert state.mean[1].item() == pytest.approx(0.99 / k + 0.01 * neg.mean().item(), rel=1e-5)
    assert state.var[0].item() == pytest.approx(0.99 * 0.5 + 0.01 * pos.var(unbiased=True).item(), rel=1e-5)
    assert state.var[1].item() == pytest.approx(0.99 * 0.5 + 0.01 * neg.var(unbiased=True).item(), rel=1e-5)
    sigma = state.var.sqrt()
    assert state.safe_threshold.item() == pytest.approx(
        min(max(state.mean[0].item() - 3 * sigma[0].item(), 1 / k), 1.0), rel=1e-5)


def test_a_set_with_fewer_than_ten_pixels_keeps_its_statistics():
    state = DAWState(num_classes=2, momentum=0.5)
    probs = torch.zeros(1, 2, 4, 4)
    probs[:, 1] = 0.9
    probs[:, 0] = 0.1
    target = torch.ones(1, 4, 4, dtype=torch.long)
    target[0, 0, :3] = 0  # 3 wrong pixels: too few
    state.update(probs, target)
    assert state.mean[1].item() == pytest.approx(0.5)  # negative: unchanged
    assert state.mean[0].item() == pytest.approx(0.5 * 0.5 + 0.5 * 0.9)  # positive: updated


def test_ignored_pixels_are_in_neither_set():
    probs = torch.softmax(torch.randn(1, 3, 4, 4), 1)
    target = torch.full((1, 4, 4), 255)
    _, positive, negative = confidence_sets(probs, target, ignore_index=255)
    assert not positive.any() and not negative.any()


def test_alignment_is_the_identity_when_the_averages_agree_and_sums_to_one():
    probs = torch.softmax(torch.randn(2, 5, 6, 6), 1)
    same = torch.rand(5) + 0.2
    torch.testing.assert_close(align_distribution(probs, same, same), probs)
    aligned = align_distribution(probs, torch.rand(5) + 0.1, torch.rand(5) + 0.1)
    torch.testing.assert_close(aligned.sum(1), torch.ones(2, 6, 6))
    assert (aligned >= 0).all()


def test_alignment_raises_classes_that_are_underconfident_on_unlabeled_data():
    probs = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    aligned = align_distribution(probs, torch.tensor([0.9, 0.9]), torch.tensor([0.9, 0.6]))
    assert aligned[0, 1, 0, 0] > aligned[0, 0, 0, 0]


def reference_update(state_mean_lab, state_mean_unl, lab_probs, lab_valid, unl_probs, unl_valid, momentum):
    """The plain per-class loop (as the paper's code writes it)."""
    lab = state_mean_lab.clone()
    unl = state_mean_unl.clone()
    lab_conf, lab_pred = lab_probs.max(1)
    unl_conf, unl_pred = unl_probs.max(1)
    for k in range(lab.numel()):
        sel = torch.masked_select(lab_conf, (lab_pred == k) & lab_valid)
        if sel.numel() > 0:
            lab[k] = momentum * lab[k] + (1 - momentum) * sel.mean()
        sel = torch.masked_select(unl_conf, (unl_pred == k) & unl_valid)
        if sel.numel() > 0:
            unl[k] = momentum * unl[k] + (1 - momentum) * sel.mean()
    return lab, unl


def test_vectorised_alignment_update_equals_the_per_class_loop():
    torch.manual_seed(1)
    k = 7
    state = DAWState(num_classes=k, momentum=0.9)
    for _ in range(3):
        lab_probs = torch.softmax(torch.randn(2, k, 12, 12) * 2, 1)
        unl_probs = torch.softmax(torch.randn(3, k, 12, 12) * 2, 1)
        lab_probs[:, 6] = 0  # class 6 never predicted: its means must stay put
        unl_probs[:, 6] = 0
        lab_valid = torch.rand(2, 12, 12) > 0.2
        unl_valid = torch.rand(3, 12, 12) > 0.2
        target = torch.where(lab_valid, torch.randint(0, k, (2, 12, 12)), torch.tensor(255))
        expected = reference_update(state.labeled_class_mean, state.unlabeled_class_mean,
                                    lab_probs, lab_valid, unl_probs, unl_valid, 0.9)
        state.update(lab_probs, target, unl_probs, unl_valid, ignore_index=255)
        torch.testing.assert_close(state.labeled_class_mean, expected[0])
        torch.testing.assert_close(state.unlabeled_class_mean, expected[1])
    assert state.labeled_class_mean[6].item() == pytest.approx(1 / k)


def test_vectorised_statistics_equal_masked_select():
    values = torch.rand(3, 10, 10)
    masks = torch.stack([values > 0.5, values <= 0.5])
    count, mean, var = masked_mean_var(values, masks)
    for i in range(2):
        sel = values[masks[i]]
        assert count[i].item() == sel.numel()
        assert mean[i].item() == pytest.approx(sel.mean().item(), rel=1e-5)
        assert var[i].item() == pytest.approx(sel.var(unbiased=True).item(), rel=1e-4)
    confidence, prediction = torch.softmax(torch.randn(2, 3, 5, 5), 1).max(1)
    count, mean = class_mean_confidence(confidence, prediction, None, 3)
    assert count.sum().item() == 50
    for k in range(3):
        if count[k] > 0:
            assert mean[k].item() == pytest.approx(confidence[prediction == k].mean().item(), rel=1e-6)


def test_state_round_trips_through_a_state_dict():
    state = DAWState(num_classes=3)
    probs = torch.softmax(torch.randn(2, 3, 8, 8) * 3, 1)
    state.update(probs, torch.randint(0, 3, (2, 8, 8)), probs.flip(0))
    restored = DAWState(num_classes=3)
    restored.load_state_dict(state.state_dict())
    for name, value in state.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name])
    assert restored.threshold.item() == state.threshold.item()


def test_max_and_argmax_equals_torch_max_including_ties():
    from mitoseg.semi.daw import max_and_argmax

    probs = torch.softmax(torch.randn(3, 6, 9, 11), 1)
    probs[0, 2, 0, 0] = probs[0, 4, 0, 0] = 2.0  # a tie: the first class wins, as in torch.max
    probs[1, :, 3, 3] = 0.25
    values, index = max_and_argmax(probs)
    expected_values, expected_index = probs.max(dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(index, expected_index)
    assert index[0, 0, 0] == 2 and index[1, 3, 3] == 0


def test_max_and_argmax_beyond_255_classes_and_with_a_reused_workspace():
    from mitoseg.semi.daw import argmax_workspace, max_and_argmax

    many = torch.softmax(torch.randn(2, 300, 4, 5), 1)
    values, index = max_and_argmax(many)
    assert torch.equal(index, many.max(dim=1).indices) and torch.equal(values, many.amax(dim=1))
    probs = torch.softmax(torch.randn(2, 7, 6, 6), 1)
    workspace = argmax_workspace(probs)
    for _ in range(2):  # the marks left by the first call must not leak into the second
        probs = probs.roll(1, dims=1)
        assert torch.equal(max_and_argmax(probs, workspace)[1], probs.max(dim=1).indices)


def test_nan_probabilities_give_valid_indices_and_leave_the_statistics_finite():
    # Under fp16 autocast a fresh network in eval mode can overflow: its softmax is NaN.
    from mitoseg.semi.daw import max_and_argmax

    torch.manual_seed(0)
    k = 4
    labeled = torch.softmax(torch.randn(2, k, 8, 8) * 3, 1)
    unlabeled = torch.softmax(torch.randn(2, k, 8, 8) * 3, 1)
    labeled[0, :, :4] = float("nan")
    unlabeled[1] = float("nan")
    target = torch.randint(0, k, (2, 8, 8))
    confidence, index = max_and_argmax(unlabeled)
    assert int(index.min()) >= 0 and int(index.max()) < k
    assert torch.isnan(confidence[1]).all() and torch.isfinite(confidence[0]).all()

    state = DAWState(num_classes=k)
    for _ in range(3):
        state.update(labeled, target, unlabeled.clone())
    for name, value in state.state_dict().items():
        assert torch.isfinite(value).all(), name
    # The finite pixels still move the statistics: the same update on them alone gives the same state.
    clean = DAWState(num_classes=k)
    for _ in range(3):
        clean.update(labeled[1:], target[1:], unlabeled[:1].clone())
    assert not torch.equal(state.mean, DAWState(num_classes=k).mean)  # the finite labeled pixels moved it
    torch.testing.assert_close(state.unlabeled_class_mean, clean.unlabeled_class_mean)
    aligned = state.align(unlabeled.clone())
    weight = aligned.amax(1) >= state.threshold
    assert not weight[1].any()  # NaN pixels are never used


def test_moments_of_parts_add_up_to_the_statistics_of_the_whole():
    from mitoseg.semi.daw import mean_var_from_moments, moments

    torch.manual_seed(1)
    values = torch.rand(500)
    masks = torch.rand(2, 500) > 0.3
    whole = masked_mean_var(values, masks)
    parts = [masked_mean_var(values[:120], masks[:, :120]), masked_mean_var(values[120:], masks[:, 120:])]
    pooled = mean_var_from_moments(sum(moments(*part) for part in parts))
    for got, expected in zip(pooled, whole):
        torch.testing.assert_close(got, expected)


def _daw_rank(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    labeled, target, unlabeled = _two_rank_batches()
    state = DAWState(num_classes=3)
    for _ in range(2):
        state.update(labeled[rank:rank + 1], target[rank:rank + 1], unlabeled[rank:rank + 1].clone())
    torch.save(state.state_dict(), f"{result_file}.{rank}")
    dist.destroy_process_group()


def _two_rank_batches():
    generator = torch.Generator().manual_seed(3)
    labeled = torch.softmax(torch.randn(2, 3, 16, 16, generator=generator) * 2, 1)
    target = labeled.argmax(1)
    target[1, :, :6] = (target[1, :, :6] + 1) % 3  # wrong predictions only on rank 1
    unlabeled = torch.softmax(torch.randn(2, 3, 16, 16, generator=generator) * 2, 1)
    unlabeled[0, 2] = 0.0  # class 2 is never predicted on rank 0's unlabeled image
    unlabeled = unlabeled / unlabeled.sum(1, keepdim=True)
    return labeled, target, unlabeled


@pytest.mark.slow
def test_two_ranks_hold_the_state_of_one_process_that_saw_both_batches(tmp_path):
    # Rank 0 has no wrong pixels and no unlabeled pixel of class 2: averaging per-rank means would
    # halve those statistics; pooling counts and sums gives the single-process numbers.
    import torch.multiprocessing as mp

    result = str(tmp_path / "state")
    mp.start_processes(_daw_rank, args=(2, str(tmp_path / "init"), result), nprocs=2, start_method="spawn")
    labeled, target, unlabeled = _two_rank_batches()
    single = DAWState(num_classes=3)
    for _ in range(2):
        single.update(labeled, target, unlabeled.clone())
    for rank in range(2):
        state = torch.load(f"{result}.{rank}", weights_only=True)
        for name, value in single.state_dict().items():
            torch.testing.assert_close(state[name], value, msg=f"rank {rank}: {name}")


# ------------------------------------------------ the update read off the logits (issue 18)


def _logits_with_edge_cases(generator, shape, k):
    logits = torch.randn(*shape[:1], k, *shape[1:], generator=generator) * 3
    flat = logits.movedim(1, -1).reshape(-1, k)
    flat[0, :2] = flat[0].max() + 1.0  # a tie at the max: the first class wins
    flat[1] = 0.5  # every class tied
    flat[2, 1] = float("nan")  # NaN: NaN confidence, a valid class
    flat[3, 0] = float("inf")
    flat[4, -1] = -float("inf")
    return flat.reshape(*shape[:1], *shape[1:], k).movedim(-1, 1).contiguous()


@pytest.mark.parametrize("shape,k", [((3, 17, 29), 5), ((2, 3, 9, 11), 4), ((2, 40, 41), 2), ((1, 5, 7), 300)])
def test_softmax_confidence_equals_the_max_of_the_softmax(shape, k):
    from mitoseg.semi.daw import max_and_argmax, softmax_confidence

    generator = torch.Generator().manual_seed(0)
    logits = _logits_with_edge_cases(generator, shape, k)
    expected_conf, expected_index = max_and_argmax(torch.softmax(logits, 1))
    variants = [logits, [logits[:1], logits[1:]]]  # a list: parts along the batch
    if logits.dim() == 4:
        variants.append(logits.to(memory_format=torch.channels_last))
    finite = torch.isfinite(expected_conf)  # a NaN pixel's class: any valid one
    for variant in variants:
        confidence, index = softmax_confidence(variant)
        torch.testing.assert_close(confidence, expected_conf, equal_nan=True)
        assert torch.equal(index[finite], expected_index[finite])
        assert int(index.min()) >= 0 and int(index.max()) < k
    confidence, index = softmax_confidence(logits.bfloat16())  # autocast's logits, read as float32
    expected = max_and_argmax(torch.softmax(logits.bfloat16().float(), 1))
    torch.testing.assert_close(confidence, expected[0], equal_nan=True)
    assert torch.equal(index[finite], expected[1][finite])


def test_a_larger_block_than_the_cpu_block_gives_the_same_result(monkeypatch):
    import mitoseg.semi.daw as daw

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 50, 61, generator=generator) * 4
    whole = daw.softmax_confidence(logits)
    monkeypatch.setattr(daw, "CPU_BLOCK_PIXELS", 300)  # many blocks, a short last one
    blocked = daw.softmax_confidence(logits)
    torch.testing.assert_close(blocked[0], whole[0])
    assert torch.equal(blocked[1], whole[1])


def test_aligned_confidence_from_logits_or_probabilities_equals_aligning_the_softmax():
    from mitoseg.semi.daw import alignment_scale, max_and_argmax, scaled_confidence, softmax_confidence

    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 7, 23, 19, generator=generator) * 3
    labeled_mean, unlabeled_mean = torch.rand(7, generator=generator) + 0.2, torch.rand(7, generator=generator) + 0.2
    probs = torch.softmax(logits, 1)
    expected = max_and_argmax(align_distribution(probs, labeled_mean, unlabeled_mean))
    scale = alignment_scale(labeled_mean, unlabeled_mean)
    for confidence, index in (softmax_confidence(logits, scale.log()), scaled_confidence(probs, scale)):
        torch.testing.assert_close(confidence, expected[0])
        assert torch.equal(index, expected[1])


def test_grouped_sums_equal_the_masked_statistics():
    from mitoseg.semi.daw import grouped_sums, labeled_groups, mean_var_from_moments

    generator = torch.Generator().manual_seed(3)
    k = 4
    confidence = torch.rand(2, 30, 30, generator=generator)
    prediction = torch.randint(0, k + 1, (2, 30, 30), generator=generator)  # K: a non-finite pixel
    target = torch.randint(0, k, (2, 30, 30), generator=generator)
    target[:, :5] = 255
    group = labeled_groups(prediction, target, k, ignore_index=255)
    sums = grouped_sums(group, confidence, 2 * k + 1)
    finite = prediction < k
    positive, negative = correct_and_wrong(prediction, target, 255)
    expected = masked_mean_var(confidence, torch.stack([positive & finite, negative & finite]))
    got = mean_var_from_moments(torch.stack([sums[:k].sum(0), sums[k:2 * k].sum(0)]))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    without_squares = grouped_sums(group, confidence, 2 * k + 1, squares=False)
    torch.testing.assert_close(without_squares[:, :2], sums[:, :2])
    assert not without_squares[:, 2].any()


@pytest.mark.parametrize("align", [True, False])
def test_update_from_logits_equals_the_update_from_the_softmax(align):
    from mitoseg.semi.daw import max_and_argmax

    generator = torch.Generator().manual_seed(4)
    k = 5
    fused, plain = DAWState(num_classes=k, momentum=0.8), DAWState(num_classes=k, momentum=0.8)
    for step in range(4):
        labeled = torch.randn(2, k, 20, 24, generator=generator) * 2
        target = torch.where(torch.rand(2, 20, 24, generator=generator) < 0.6, labeled.argmax(1),
                             torch.randint(0, k, (2, 20, 24), generator=generator))
        target[:, :, -4:] = 255  # padding / ignored label
        unlabeled = torch.randn(4, k, 20, 24, generator=generator) * 2
        valid = torch.ones(4, 20, 24, dtype=torch.bool)
        valid[:, -3:] = False
        if step == 2:
            labeled[0, :, 0, 0] = float("nan")
            unlabeled[1, :, 5, 5] = float("nan")
        stats, confidence, pseudo = fused.update_logits(labeled, target, [unlabeled[:2], unlabeled[2:]], valid,
                                                        ignore_index=255, align=align)
        probs = torch.softmax(unlabeled, 1)
        expected_stats = plain.update(torch.softmax(labeled, 1), target, probs if align else None, valid,
                                      ignore_index=255)
        if align:
            probs = plain.align(probs)
        expected = max_and_argmax(probs)
        torch.testing.assert_close(confidence, expected[0], equal_nan=True)
        assert torch.equal(pseudo, expected[1])
        for name, value in plain.state_dict().items():
            torch.testing.assert_close(getattr(fused, name), value, msg=name)
        assert torch.equal(stats.positive, expected_stats.positive)
        assert torch.equal(stats.negative, expected_stats.negative)
        for state in (fused, plain):
            assert all(torch.isfinite(v).all() for v in state.state_dict().values())
