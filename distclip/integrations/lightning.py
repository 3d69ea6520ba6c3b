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

from distclip.integrations._callback import ClipperSteps

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the standalone package
    from pytorch_lightning import Callback, LightningModule, Trainer


class GradClipperCallback(ClipperSteps, Callback):
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
        self._start(max_norm, norm_type, prefix, options, "Lightning")
        self.log = log

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.gradient_clip_val:
            raise ValueError(
                "distclip: the Trainer's gradient_clip_val would clip again after GradClipperCallback; leave it unset"
            )

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        report = self._clip_step(trainer.strategy.model or pl_module, optimizer, scaler)
        if self.log:
            pl_module.log_dict(report.as_dict(self.prefix), on_step=True, on_epoch=False)
