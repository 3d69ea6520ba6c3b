"""ClipReport: what one `GradClipper.clip_` measured and decided, as device tensors read only on request."""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClipReport:
    """What one `GradClipper.clip_` did. Every field is a 0-d tensor on the gradients' device with the
    same value on every rank (``unit_norms``: one per unit), so building it never synchronises; reading a
    value (``float()``, ``.item()``, `skipped`, ``as_dict(host=True)``) does.

    - ``norm``: the pre-clip total norm, as `distclip.clip_grad_norm_` returns it (the gradients' dtype
      on one process, float64 when sharded).
    - ``threshold``: this step's clip threshold, ``min(max_norm, every clip policy's threshold)`` (float64).
    - ``coefficient``: what the gradients are multiplied by, ``min(threshold / (norm + 1e-6), 1)``, and 1 on a
      skipped step. With AGC, the global factor; each unit takes the smaller of it and its own.
    - ``clipped``: whether clipping changed the gradients (``coefficient < 1``; with AGC, ``post_norm < norm``).
    - ``post_norm``: the norm after clipping (``norm * coefficient``; measured again with AGC).
    - ``nonfinite``: whether ``norm`` is NaN or inf.
    - ``skip``: whether this step must be skipped (a skip policy fired, or ``nonfinite="skip"`` met a
      non-finite norm); the gradients are then left unchanged.
    - ``skip_threshold``: the skip policies' threshold (``inf`` without any).
    - ``steps``, ``clipped_steps``, ``skipped_steps``: int64 counts over the clipper's life (restored by
      `GradClipper.load_state_dict`).
    - ``unit_names``, ``unit_norms``: the pre-clip norms per parameter or per module, when asked.
    - ``may_skip``: whether this clipper can skip at all; when not, `skipped` reads nothing.
    """

    norm: Tensor
    threshold: Tensor
    coefficient: Tensor
    clipped: Tensor
    post_norm: Tensor
    nonfinite: Tensor
    skip: Tensor
    skip_threshold: Tensor
    steps: Tensor
    clipped_steps: Tensor
    skipped_steps: Tensor
    unit_names: tuple[str, ...] = ()
    unit_norms: Tensor | None = None
    may_skip: bool = False

    @property
    def skipped(self) -> bool:
        """Whether the step is skipped, as a Python bool: this reads the device (one synchronisation), unless
        the clipper cannot skip (``may_skip`` is False)."""
        return self.may_skip and bool(self.skip)

    @property
    def clip_rate(self) -> Tensor:
        """The fraction of steps so far whose gradients were clipped, ``clipped_steps / steps`` (float64)."""
        return self.clipped_steps.to(torch.float64) / self.steps.to(torch.float64)

    def as_dict(self, prefix: str = "", *, host: bool = False) -> dict[str, Any]:
        """A flat ``{name: value}`` dict for loggers, every value a float64 0-d tensor (no synchronisation),
        or with ``host=True`` a Python float (one synchronisation for the whole dict).

        Keys, after ``prefix``: ``norm``, ``post_norm``, ``threshold``, ``coefficient``, ``clipped``,
        ``nonfinite``, ``clip_rate``, with ``skipped``, ``skipped_steps`` and ``skip_threshold`` when the
        clipper can skip, and ``norm/<unit>`` for each per-unit norm.
        """
        values = {
            "norm": self.norm,
            "post_norm": self.post_norm,
            "threshold": self.threshold,
            "coefficient": self.coefficient,
            "clipped": self.clipped,
            "nonfinite": self.nonfinite,
            "clip_rate": self.clip_rate,
        }
        if self.may_skip:
            values.update(skipped=self.skip, skipped_steps=self.skipped_steps, skip_threshold=self.skip_threshold)
        names = [prefix + name for name in values] + [f"{prefix}norm/{name}" for name in self.unit_names]
        scalars = [v.to(self.norm.device, torch.float64).reshape(1) for v in values.values()]
        if self.unit_norms is not None:
            scalars.append(self.unit_norms.to(self.norm.device, torch.float64))
        stacked = torch.cat(scalars)
        return dict(zip(names, stacked.tolist() if host else stacked.unbind()))
