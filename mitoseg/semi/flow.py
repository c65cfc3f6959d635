"""Density estimation for DDFP (Wang et al., CVPR 2024): a normalizing flow over per-pixel feature
vectors with a Gaussian-mixture prior, and the density-descending perturbation.

The flow is FrEIA's ``SequenceINN`` of GLOW coupling blocks, each followed by a
fixed random permutation. The prior has one unit-covariance Gaussian per class
with learnable means: a labeled feature is scored by its class's component, an
unlabeled one by the uniform mixture. The perturbation moves a feature map one
step of norm ``eps`` per pixel up the gradient of the flow's negative
log-likelihood, i.e. toward lower feature density.

Pure, vectorised functions (no Python loop over classes or pixels, no host
synchronisation) plus :class:`DensityModel` (flow + prior) and
:class:`FlowTrainer` (its Adam optimizer, learning-rate schedule and one online
training step); ``mitoseg/methods/ddfp.py`` composes them.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import FrEIA.framework as Ff
import FrEIA.modules as Fm

from mitoseg.distributed import all_reduce_gradients

LOG_2PI = math.log(2 * math.pi)
UNLABELED = -1  # flow training label of an unlabeled feature: scored by the mixture
EXCLUDED = -2  # an ignored pixel: never sampled while others remain, and weighted 0 if it is


# ------------------------------------------------------------------- maths


class _MixtureComponentLogDensity(torch.autograd.Function):
    """-0.5 (|z|^2 - 2 z.mu + |mu|^2 + D log 2 pi) with a fused backward.

    Forward: one matrix product and in-place updates of its (N, K) output. Backward, for the
    upstream gradient G (N, K): dz = G mu - z * rowsum(G), dmu = G^T z - mu * colsum(G): one matrix
    product and one in-place multiply-add each, no (N, D) temporaries beyond the gradients.
    """

    @staticmethod
    def forward(ctx, z, means):
        ctx.save_for_backward(z, means)
        out = torch.addmm((means * means).sum(1), z, means.t(), alpha=-2.0)  # |mu|^2 - 2 z.mu
        out.add_(torch.linalg.vector_norm(z, dim=1).square_().unsqueeze(1)).add_(z.shape[1] * LOG_2PI)
        return out.mul_(-0.5)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        z, means = ctx.saved_tensors
        grad_z = grad_means = None
        if ctx.needs_input_grad[0]:
            grad_z = torch.mm(grad, means).addcmul_(z, grad.sum(1, keepdim=True), value=-1.0)
        if ctx.needs_input_grad[1]:
            grad_means = torch.mm(grad.t(), z).addcmul_(means, grad.sum(0).unsqueeze(1), value=-1.0)
        return grad_z, grad_means


def mixture_component_log_density(z: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """log N(z; mu_k, I) for every row of ``z`` (N, D) and component ``means`` (K, D): (N, K).

    Uses |z - mu|^2 = |z|^2 - 2 z.mu + |mu|^2, one matrix product: the (N, K, D)
    difference tensor is never formed (once differentiable).
    """
    if z.dtype != means.dtype:
        means = means.to(z.dtype)
    return _MixtureComponentLogDensity.apply(z, means)


def mixture_component_log_density_reference(z: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The naive formula, repeating ``z`` per component ((N, K, D) memory). Tests and benchmarks only."""
    k = means.shape[0]
    diff = z.unsqueeze(1).repeat(1, k, 1) - means.unsqueeze(0)
    return -0.5 * ((diff * diff).sum(-1) + z.shape[1] * LOG_2PI)


def mixture_log_density(component: torch.Tensor) -> torch.Tensor:
    """log of the uniform mixture, from the component log-densities (N, K): (N,)."""
    return torch.logsumexp(component, dim=1) - math.log(component.shape[1])


def prior_log_density(component: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Prior log-density per row: its class's component where ``labels >= 0``, else the mixture."""
    mixture = mixture_log_density(component)
    if labels is None:
        return mixture
    own = component.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(labels >= 0, own, mixture)


def bits_per_dim(nll: torch.Tensor, dim: int) -> torch.Tensor:
    """A negative log-likelihood in nats per vector -> bits per dimension."""
    return nll / (dim * math.log(2.0))


def flatten_pixels(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C), pixel order b, y, x (and (B, C, D, H, W) -> (B*D*H*W, C))."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def unflatten_pixels(vectors: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`flatten_pixels`: (N, C) vectors back to the layout of ``like`` (B, C, *spatial)."""
    b, c, *spatial = like.shape
    return vectors.reshape(b, *spatial, c).movedim(-1, 1)


def labels_to_grid(label: torch.Tensor, size, ignore_index: int | None = None) -> torch.Tensor:
    """Ground truth (B, H, W) (or (B, D, H, W)) nearest-downsampled to the feature grid ``size``; ignored
    pixels -> EXCLUDED."""
    if tuple(label.shape[1:]) != tuple(size):
        label = F.interpolate(label[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
    label = label.long()
    if ignore_index is not None:
        label = torch.where(label == ignore_index, torch.full_like(label, EXCLUDED), label)
    return label


def sample_pixels(features: torch.Tensor, labels: torch.Tensor, max_pixels: int):
    """At most ``max_pixels`` random feature vectors, EXCLUDED ones only when nothing else is left.

    features: (N, C); labels: (N,). Returns (features (M, C), labels (M,), valid (M,) bool) with
    M = min(max_pixels, N). Uses the global torch RNG (saved in checkpoints), a fixed M and no
    host synchronisation.
    """
    count = min(max_pixels, labels.shape[0])
    score = torch.rand(labels.shape, device=labels.device) + (labels == EXCLUDED).to(torch.float32)
    index = score.topk(count, largest=False, sorted=False).indices
    picked = labels[index]
    return features[index], picked, picked != EXCLUDED


def subsample_mask(mask: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """``mask`` (any shape, bool) with at most ``max_pixels`` of its True entries kept, drawn uniformly at
    random (the global torch RNG); all of them when there are fewer. A fixed-size ``topk``: no host
    synchronisation."""
    flat = mask.reshape(-1)
    count = min(max_pixels, flat.shape[0])
    if count == flat.shape[0]:
        return mask
    score = torch.rand(flat.shape, device=flat.device) + (~flat).to(torch.float32)  # unmasked entries last
    index = score.topk(count, largest=False, sorted=False).indices
    kept = torch.zeros_like(flat).index_fill_(0, index, True) & flat
    return kept.reshape(mask.shape)


def masked_flow_gradient(h: torch.Tensor, mask: torch.Tensor, log_density: Callable[[torch.Tensor], torch.Tensor],
                         chunk: int | None = None) -> torch.Tensor:
    """d(-sum of log_density over the pixels of ``mask``) / d h, for (B, C, *grid) features ``h`` and a
    (B, *grid) bool ``mask``: the flow runs on the masked pixels' vectors only (in blocks of ``chunk``),
    every other pixel's gradient is 0. The same as weighting every pixel's log-density by the mask, where
    the log-densities are finite."""
    vectors = flatten_pixels(h)
    index = mask.reshape(-1).nonzero().squeeze(1)
    grad = torch.zeros_like(vectors)
    picked = vectors.index_select(0, index)
    for start in range(0, picked.shape[0], chunk or max(1, picked.shape[0])):
        block = picked[start:start + (chunk or picked.shape[0])].detach().requires_grad_(True)
        (block_grad,) = torch.autograd.grad(-log_density(block).sum(), block)
        grad.index_copy_(0, index[start:start + block.shape[0]], block_grad)
    return unflatten_pixels(grad, h)


def density_descending_perturbation(features: torch.Tensor, penultimate: Callable[[torch.Tensor], torch.Tensor],
                                    log_density: Callable[[torch.Tensor], torch.Tensor], eps: float,
                                    chunk: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """delta = eps * grad_f NLL / |grad_f NLL|, the L2 norm taken over channels per pixel.

    features: (B, F, *spatial), the head's input; ``penultimate`` maps them to the (B, C, *grid)
    features the flow reads; ``log_density`` maps (N, C) vectors to (N,) log-densities. The NLL is
    summed over the pixels of ``mask`` ((B, *grid) bool; None: every pixel), so, as DDFP's code
    (model/model/attack.py, which takes the flow loss over confident pseudo-labels only), a pixel of
    the flow's grid outside the mask contributes no gradient, and where no masked pixel reaches a
    feature its delta is 0. The gradient is taken w.r.t. ``features`` only (no parameter gradients
    are accumulated); the result is detached, so no gradient flows through delta.

    ``chunk``: the flow's part (forward and backward) runs on blocks of at most this many
    feature vectors, which bounds its memory to one block's activations and, on the CPU,
    keeps them in cache; the pixels are independent there, so the result is the same.
    On the CPU with a ``mask``, the flow runs on the masked pixels alone (the others' gradient
    is 0): the flow costs in proportion to the pseudo-labels used (on a GPU the pixels would be
    counted on the host, a synchronisation per step, so every pixel goes through, weighted).
    """
    with torch.enable_grad():
        f = features.detach().requires_grad_(True)
        h = penultimate(f)
        if mask is not None and h.device.type == "cpu":
            grad_h = masked_flow_gradient(h.detach(), mask, log_density, chunk)
            (grad,) = torch.autograd.grad(h, f, grad_outputs=grad_h)
            return eps * F.normalize(grad, p=2, dim=1)
        weight = None if mask is None else mask.reshape(-1).to(h.dtype)
        if chunk is None or chunk >= h.numel() // h.shape[1]:
            log_p = log_density(flatten_pixels(h))
            nll = -(log_p if weight is None else log_p * weight).sum()
            (grad,) = torch.autograd.grad(nll, f)
        else:
            blocks = []
            weights = itertools.repeat(None) if weight is None else weight.split(chunk)
            for block, w in zip(flatten_pixels(h.detach()).split(chunk), weights):
                block.requires_grad_(True)
                log_p = log_density(block)
                blocks.append(torch.autograd.grad(-(log_p if w is None else log_p * w).sum(), block)[0])
            grad_h = unflatten_pixels(torch.cat(blocks), h)
            (grad,) = torch.autograd.grad(h, f, grad_outputs=grad_h)
    return eps * F.normalize(grad, p=2, dim=1)


# -------------------------------------------------------------------- model


FLOW_INITS = ("official", "identity", "default")
FLOW_PRECISIONS = ("float32", "bfloat16")


class Float32Output(nn.Module):
    """The last module of a coupling subnetwork: its output back in float32. Under a bfloat16 autocast the
    subnetwork's matrix products (nearly all of the flow's FLOPs) run in bfloat16, while the coupling's
    exp, the log-determinant and the prior, which sum many terms, stay in float32. No parameters (the
    checkpoint keys are those of a float32 flow); a no-op outside autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x  # a float64 flow stays float64


def build_flow(dim: int, blocks: int = 2, hidden: int = 256, clamp: float = 2.0, seed: int = 0,
               init: str = "official") -> Ff.SequenceINN:
    """FrEIA ``SequenceINN``: ``blocks`` x (GLOWCouplingBlock, PermuteRandom) over ``dim`` channels.

    ``init``:

    - ``official`` (DDFP's code, model/flow/model.py): subnetworks Linear-ReLU-Linear-ReLU-Linear of
      width ``hidden``, every flow parameter drawn from 0.05 * N(0, 1), so the initial flow is a small
      random map, not the identity;
    - ``identity``: subnetworks Linear-ReLU-Linear whose last layer starts at zero: the flow starts as
      the identity;
    - ``default``: subnetworks Linear-ReLU-Linear with PyTorch's default initialisation.

    The permutations are seeded from ``seed`` without disturbing numpy's global RNG.
    """
    if init not in FLOW_INITS:
        raise ValueError(f"unknown flow init {init!r}; expected one of {FLOW_INITS}")

    def subnet(c_in: int, c_out: int) -> nn.Module:
        if init == "official":
            return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, c_out), Float32Output())
        net = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c_out), Float32Output())
        if init == "identity":
            nn.init.zeros_(net[-2].weight)
            nn.init.zeros_(net[-2].bias)
        return net

    flow = Ff.SequenceINN(dim)
    numpy_state = np.random.get_state()  # PermuteRandom reseeds numpy's global RNG
    try:
        for i in range(blocks):
            flow.append(Fm.GLOWCouplingBlock, subnet_constructor=subnet, clamp=clamp)
            flow.append(Fm.PermuteRandom, seed=seed * 1000 + i)
    finally:
        np.random.set_state(numpy_state)
    if init == "official":
        with torch.no_grad():
            for param in flow.parameters():
                if param.requires_grad:
                    param.copy_(0.05 * torch.randn_like(param))
    return flow


class DensityModel(nn.Module):
    """The flow and its prior: one unit-covariance Gaussian per class, learnable means (K, D).

    Initialised from ``seed`` inside a forked RNG, so building it leaves the global RNGs untouched.
    ``precision``: ``float32``, or ``bfloat16``: the coupling subnetworks' matrix products under a bfloat16
    autocast (:class:`Float32Output`), whatever autocast the caller runs under; parameters, inputs,
    log-determinants and the prior stay float32.
    """

    def __init__(self, dim: int, num_classes: int, blocks: int = 2, hidden: int = 256, clamp: float = 2.0,
                 seed: int = 0, init: str = "official", precision: str = "float32"):
        super().__init__()
        if precision not in FLOW_PRECISIONS:
            raise ValueError(f"unknown flow precision {precision!r}; expected one of {FLOW_PRECISIONS}")
        self.dim = dim
        self.precision = precision
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.flow = build_flow(dim, blocks, hidden, clamp, seed, init)
            self.means = nn.Parameter(torch.randn(num_classes, dim))

    def transform(self, x: torch.Tensor):
        """x (N, D) -> (component log-densities of f(x) (N, K), log |det df/dx| (N,))."""
        bf16 = self.precision == "bfloat16"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            z, log_jac = self.flow(x)
        return mixture_component_log_density(z, self.means), log_jac

    def log_density(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) (N,): the mixture for unlabeled rows, the class's component for labeled ones."""
        component, log_jac = self.transform(x)
        return prior_log_density(component, labels) + log_jac

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior class scores (N, K) of the prior's components (the flow as a classifier)."""
        return self.transform(x)[0]

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return self.flow(z, rev=True)[0]


class FlowTrainer:
    """Online maximum-likelihood training of a :class:`DensityModel`.

    Adam (``betas``), gradient-norm clipping, and a learning rate decaying exponentially from
    ``lr`` to ``final_lr_ratio * lr`` over ``total_steps`` steps (a ``LambdaLR``). Everything
    goes through ``state_dict`` as plain tensors and numbers.

    A step whose gradient is not finite (features of a diverging network, an overflow) is skipped:
    the fused Adam takes a ``found_inf`` flag on the device and then leaves the flow's parameters,
    its moments and its step count as they were, without a host synchronisation. (On a PyTorch
    without a fused Adam for the device, the flag is read on the host instead.)
    """

    def __init__(self, model: DensityModel, lr: float = 1e-3, betas=(0.5, 0.9), grad_clip: float = 50.0,
                 final_lr_ratio: float = 0.01, total_steps: int = 1, noise: float = 0.05,
                 max_pixels: int = 20480):
        self.model = model
        self.grad_clip = grad_clip
        self.noise = noise
        self.max_pixels = max_pixels
        self.params = [p for p in model.parameters() if p.requires_grad]  # not the fixed permutations
        try:
            self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=tuple(betas), fused=True)
            self.fused = True
        except RuntimeError:  # PyTorch < 2.4 has no fused Adam on the CPU
            self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=tuple(betas))
            self.fused = False
        span = max(1, total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: final_lr_ratio ** min(1.0, step / span))

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One update on features (N, D) with labels (N,) (class id, UNLABELED or EXCLUDED).

        Samples at most ``max_pixels`` rows, adds Gaussian input noise, minimises the mean NLL
        of the valid ones. Returns detached logs: ``flow_nll_bpd``, and the mean mixture
        log-density (nats per feature vector) of the labeled and of the unlabeled samples.
        """
        self.model.train()
        x, labels, valid = sample_pixels(features.detach().float(), labels, self.max_pixels)
        if self.noise > 0:
            x = x + self.noise * torch.randn_like(x)
        component, log_jac = self.model.transform(x)
        log_p = prior_log_density(component, labels) + log_jac
        weight = valid.to(log_p.dtype)
        nll = -(log_p * weight).sum() / weight.sum().clamp_min(1.0)
        self.optimizer.zero_grad(set_to_none=True)
        nll.backward()
        all_reduce_gradients(self.params)  # under torchrun every rank keeps the same flow (no-op otherwise)
        # The norm of the summed gradients: every rank takes the same decision.
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self._step_unless(~torch.isfinite(norm))
        self.scheduler.step()
        with torch.no_grad():
            mixture = mixture_log_density(component) + log_jac
            labeled = (labels >= 0).to(mixture.dtype)
            unlabeled = (labels == UNLABELED).to(mixture.dtype)
            return {
                "flow_nll_bpd": bits_per_dim(nll.detach(), self.model.dim),
                "logp_labeled": (mixture * labeled).sum() / labeled.sum().clamp_min(1.0),
                "logp_unlabeled": (mixture * unlabeled).sum() / unlabeled.sum().clamp_min(1.0),
            }

    def _step_unless(self, bad: torch.Tensor) -> None:
        """The Adam step, skipped where ``bad`` (a device flag) is set."""
        if self.fused:
            self.optimizer.found_inf = bad.to(torch.float32).reshape(())
            self.optimizer.step()
        elif not bool(bad):
            self.optimizer.step()

    def _fused_state(self) -> None:
        """After loading a state dict (whose param groups say how it was written): this trainer's own Adam
        implementation; the fused one keeps its step counts on the parameters' device as float32 (a
        checkpoint of mitoseg <= 0.2, written by the unfused Adam, keeps them on the CPU)."""
        for group in self.optimizer.param_groups:
            group["fused"], group["foreach"] = (True, None) if self.fused else (None, None)
        if not self.fused:
            return
        for param, state in self.optimizer.state.items():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)

    def to(self, device) -> "FlowTrainer":
        self.model.to(device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and (key != "step" or self.fused):
                    state[key] = value.to(device)
        return self

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._fused_state()
        self.scheduler.load_state_dict(dict(state["scheduler"]))
