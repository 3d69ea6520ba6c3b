"""What the framework callbacks' tests share: a tiny network, its batches and the plain loop the callbacks
are compared with (torch's clip, then an SGD step; a non-finite step skipped).

(Named ``_integration_helpers``, not ``_helpers``: the test folders have no ``__init__.py``, so a helper
module is imported by its basename alone and two ``_helpers.py`` in different folders would be one module.)
"""

import math

import torch
from torch import nn

STEPS = 4


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _batches(nan_at=None):
    batches = [torch.randn(8, 6, generator=torch.Generator().manual_seed(t)) for t in range(STEPS)]
    if nan_at is not None:
        batches[nan_at][0, 0] = math.nan
    return batches


def _reference(max_norm, lr, nan_at=None):
    """The plain loop: for each batch, backward, torch's clip, SGD step; a non-finite step is skipped."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for t, x in enumerate(_batches(nan_at)):
        opt.zero_grad()
        net(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
        if t != nan_at:
            opt.step()
    return net
