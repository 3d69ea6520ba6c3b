"""distclip: gradient clipping for distributed PyTorch.

On one process, a drop-in for ``torch.nn.utils``' clipping functions with bitwise identical results. With
``group=``, the true global norm of gradients sharded over a process group, from one collective.
"""

from distclip._functional import (
    clip_grad_norm,
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    clip_module_grad_norm_,
    fast_clip_grad_norm_,
    get_total_norm,
)
from distclip._service.agc import AGC
from distclip._service.clipper import GradClipper
from distclip._service.policies import AutoClip, SpikeSkip, ZClip
from distclip._service.report import ClipReport

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AutoClip",
    "ClipReport",
    "GradClipper",
    "SpikeSkip",
    "ZClip",
    "clip_grad_norm",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "clip_module_grad_norm_",
    "fast_clip_grad_norm_",
    "get_total_norm",
]
