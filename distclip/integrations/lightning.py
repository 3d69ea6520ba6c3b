"""PyTorch Lightning: clip through a `distclip.GradClipper` in ``on_before_optimizer_step``.

Lightning calls the hook after the backward pass (and after unscaling under 16-bit AMP) and before the
optimizer step, for each optimizer step of automatic optimisation. The callback clips the model as its strategy
wraps it (``trainer.strategy.model``: plain, DDP, FSDP, FSDP2), logs the report with ``pl_module.log_dict``,
and skips a step the report says to skip by leaving the parameters without gradients for that step (torch
optimizers, and Lightning's GradScaler step, pass over parameters whose ``.grad`` is ``None``); reading the
skip flag synchronises once, and only if the clipper can skip. Its state is saved in Lightning's checkpoints.

Set no ``gradient_clip_val`` on the Trainer: its clipping would run after this one. Built on
``lightning.pytorch`` where it is installed, else on the standalone ``pytorch_lightning``.
"""

from typing import Any

import torch

from distclip._clipper import ClipReport, GradClipper

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the standalone package
    from pytorch_lightning import Callback, LightningModule, Trainer

_LIGHTNING_OWNS = ("optimizer", "scaler", "fused")


class GradClipperCallback(Callback):
    """Clip every optimizer step with a `distclip.GradClipper` built on the first step.

    Args:
        max_norm: as `distclip.GradClipper`'s.
        norm_type: as `distclip.GradClipper`'s.
        log: log ``report.as_dict(prefix)`` every step (``on_step=True``).
        prefix: the prefix of the logged names.
        **options: the clipper's other keyword arguments (``policy``, ``nonfinite``, ``norms``, ``foreach``);
            the optimizer and GradScaler are Lightning's, and its optimizer step cannot take a fused fold.

    ``last_report`` holds the last step's `distclip.ClipReport`.
    """

    def __init__(self, max_norm: float, norm_type: float | str = 2.0, *, log: bool = True, prefix: str = "grad/",
                 **options: Any) -> None:
        super().__init__()
        taken = sorted(set(options) & set(_LIGHTNING_OWNS))
        if taken:
            raise ValueError(f"distclip: under Lightning the optimizer and GradScaler are Lightning's; drop {taken}")
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.log = log
        self.prefix = prefix
        self.options = options
        self.clipper: GradClipper | None = None
        self.last_report: ClipReport | None = None
        self._saved: dict[str, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.gradient_clip_val:
            raise ValueError(
                "distclip: the Trainer's gradient_clip_val would clip again after GradClipperCallback; leave it unset"
            )

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.clipper is None:
            self.clipper = GradClipper(
                trainer.strategy.model or pl_module, self.max_norm, self.norm_type,
                scaler=getattr(trainer.precision_plugin, "scaler", None), optimizer=optimizer, **self.options,
            )
            if self._saved is not None:
                self.clipper.load_state_dict(self._saved)
        elif optimizer is not self.clipper.optimizer:
            raise ValueError("distclip: GradClipperCallback clips for one optimizer; this model steps several")
        report = self.last_report = self.clipper.clip_()
        if self.log:
            pl_module.log_dict(report.as_dict(self.prefix), on_step=True, on_epoch=False)
        if report.skipped:
            _drop_gradients(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict() if self.clipper is not None else dict(self._saved or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.clipper is not None:
            self.clipper.load_state_dict(state_dict)
        else:
            self._saved = state_dict


def _drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Leave the optimizer's parameters without gradients, so that its step passes over all of them."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
