"""What the service's tests share: a small model and its seeded backward, the policy configurations, a
norm sequence with a spike, a run's worth of norms for the policies alone, the host-synchronisation trap,
and AGC's expected gradients.

(Named ``_service_helpers``, not ``_helpers``: the test folders have no ``__init__.py``, so a helper module is
imported by its basename alone and two ``_helpers.py`` in different folders would be one module.)
"""

import contextlib
import math
import random

import torch
from torch import nn

import distclip

INF, NAN = math.inf, math.nan
POLICIES = {
    "fixed": lambda: None,
    "autoclip": lambda: distclip.AutoClip(percentile=50),
    "zclip": lambda: distclip.ZClip(warmup_steps=3),
    "spikeskip": lambda: distclip.SpikeSkip(window=8, min_history=3, sigma=3.0),
    "agc": lambda: distclip.AGC(clipping=0.05),
    "all": lambda: [distclip.AutoClip(50), distclip.ZClip(warmup_steps=3), distclip.SpikeSkip(8, 3.0, 3)],
}


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))).to(dtype)


def _backward(module, seed, scale=1.0):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(seed), dtype=next(module.parameters()).dtype)
    (module(x).square().sum() * scale).backward()


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


def _norm_sequence(steps):
    """Scales of the gradients step by step: smooth, then a spike at step 9, then smooth again."""
    return [1.0 + 0.1 * math.sin(t) for t in range(steps)] if steps < 9 else (
        [1.0 + 0.1 * math.sin(t) for t in range(9)] + [30.0] + [1.0 + 0.1 * math.cos(t) for t in range(steps - 10)]
    )


def _policy_norms(n=120, seed=0):
    """Log-normal norms with a few spikes, a zero, a NaN and an inf: what a training run's norms look like."""
    rng = random.Random(seed)
    norms = [math.exp(rng.gauss(0.0, 0.4)) for _ in range(n)]
    for i, change in {30: 40.0, 31: 40.0, 70: 40.0, 45: NAN, 50: INF, 90: 0.0}.items():
        if i < n:
            norms[i] *= change
    return norms


def _policy_decisions(policy, norms):
    """The policy's threshold for each norm in turn, as Python floats."""
    return [policy.decide(torch.tensor(g, dtype=torch.float64)).item() for g in norms]


_TRAPPED = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def _no_host_sync():
    """Every way of reading a tensor on the host raises inside the block."""
    originals = {name: getattr(torch.Tensor, name) for name in _TRAPPED}

    def trap(name):
        def raising(self, *args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name}() inside clip_()")

        return raising

    for name in _TRAPPED:
        setattr(torch.Tensor, name, trap(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def agc_expected(weight, grad, clipping, coefficient=1.0):
    """AGC's gradient written out: each unit (row of the weight, the whole tensor for a 1-D one) scaled by
    ``min(clipping * max(|w_row|, 1e-3) / max(|g_row|, 1e-6), 1)``, capped by the clip ``coefficient``."""
    rows_w = weight.reshape(weight.shape[0], -1) if weight.ndim > 1 else weight.reshape(1, -1)
    rows_g = grad.reshape(rows_w.shape)
    factors = torch.clamp(
        clipping * torch.clamp(rows_w.norm(dim=1), min=1e-3) / torch.clamp(rows_g.norm(dim=1), min=1e-6), max=1
    )
    return (rows_g * torch.clamp(factors, max=coefficient)[:, None]).reshape(grad.shape)
