"""The faster code paths of issue 18 give the numbers of the straightforward ones: the U-Net's PReLU under
autograd, the perturbation's flow pass on the used pixels only, and the flow trained every k-th iteration."""

import pytest
import torch
import torch.nn.functional as F

from mitoseg.config import config_from_dict
from mitoseg.engine.trainer import Trainer
from mitoseg.errors import MitosegError
from mitoseg.methods import build_method
from mitoseg.networks.unet import PReLU
from mitoseg.semi.flow import DensityModel, density_descending_perturbation, flatten_pixels

from test_ddfp import ddfp_config


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("channels", [1, 6])
@pytest.mark.parametrize("shape", [(3, 6, 9, 10), (2, 6, 3, 5, 7)])
@pytest.mark.parametrize("bf16", [False, True])
def test_the_unet_prelu_equals_torch_prelu_with_and_without_gradients(channels, shape, bf16):
    torch.manual_seed(0)
    reference = torch.nn.PReLU(channels)
    with torch.no_grad():
        reference.weight.uniform_(-0.5, 0.5)
    fast = PReLU(channels)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(shape)  # no exact zero: there the gradient is PReLU's other subgradient (see PReLU)
    outputs, grads = [], []
    for module in (reference, fast):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = module(xi.bfloat16() if bf16 else xi)
        outputs.append(y)
        grads.append(torch.autograd.grad((y.float() * torch.linspace(-1, 2, y.numel()).view(y.shape)).sum(),
                                         [xi, module.weight]))
        with torch.no_grad():
            assert torch.equal(module(x), reference(x))  # prediction: F.prelu itself
    assert outputs[0].dtype == outputs[1].dtype
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)


def test_the_unet_uses_the_fast_prelu_with_unchanged_parameter_names(tiny_volumes):
    from mitoseg.networks import build_model
    from test_semi import semi_config

    cfg = config_from_dict(semi_config(tiny_volumes, "daw"))
    model = build_model(cfg.model, 2, 1)
    kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.PReLU)}
    assert kinds == {PReLU}
    assert any(name.endswith(".A.weight") or "adn" in name for name in model.state_dict())


@pytest.mark.parametrize("chunk", [None, 37])
def test_the_perturbation_on_the_used_pixels_alone_equals_weighting_every_pixel(chunk):
    torch.manual_seed(1)
    density = DensityModel(6, 3, blocks=2, hidden=16, seed=0)
    head = torch.nn.Conv2d(5, 6, 3, padding=1)
    features = torch.randn(2, 5, 9, 11)
    mask = torch.rand(2, 9, 11) < 0.4
    got = density_descending_perturbation(features, head, density.log_density, 3.0, chunk=chunk, mask=mask)

    f = features.clone().requires_grad_(True)
    log_p = density.log_density(flatten_pixels(head(f)))
    (grad,) = torch.autograd.grad(-(log_p * mask.reshape(-1).float()).sum(), f)
    torch.testing.assert_close(got, 3.0 * F.normalize(grad, p=2, dim=1), rtol=1e-4, atol=1e-6)
    nothing = density_descending_perturbation(features, head, density.log_density, 3.0, chunk=chunk,
                                              mask=torch.zeros_like(mask))
    assert not nothing.any()


def test_flow_every_trains_the_flow_on_every_kth_iteration_and_decays_over_its_steps(tiny_volumes):
    cfg = config_from_dict(ddfp_config(tiny_volumes, "daw_ddfp", flow_every=3, start_iter=2))
    method = build_method(cfg, None)
    assert [i for i in range(12) if method.flow_trains(i)] == [2, 5, 8, 11]
    assert cfg.train.iterations == 4
    # The flow's schedule spans its own steps: ceil((4 - 2) / 3) = 1.
    assert method.flow.scheduler.lr_lambdas[0](1) == pytest.approx(cfg.method.ddfp.final_lr_ratio)
    with pytest.raises(MitosegError, match="flow_every"):
        config_from_dict(ddfp_config(tiny_volumes, "daw_ddfp", flow_every=0))


def test_a_run_with_flow_every_logs_the_flow_and_resumes_exactly(tmp_path, tiny_volumes):
    cfg = ddfp_config(tiny_volumes, "daw_ddfp", flow_every=2, start_iter=0)
    Trainer(config_from_dict(cfg), tmp_path / "full", progress=False).fit()
    Trainer(config_from_dict(cfg), tmp_path / "split", max_iters=3, progress=False).fit()
    Trainer(config_from_dict(cfg), tmp_path / "split", resume=True, progress=False).fit()
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert a["method"]["ddfp"]["scheduler"]["last_epoch"] == 2  # flow steps at iterations 0 and 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in a["method"]["ddfp"]["model"].items():
        assert torch.equal(tensor, b["method"]["ddfp"]["model"][name]), name
    import json
    logs = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    flow_logs = [r["flow_nll_bpd"] for r in logs if "flow_nll_bpd" in r]
    assert len(flow_logs) == 4 and all(v == v for v in flow_logs)  # every step, none NaN
