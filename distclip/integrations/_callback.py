"""What the trainer callbacks share: a `distclip.GradClipper` built on the first optimizer step, one clip per step,
a skipped step left without gradients, and the clipper's state kept until the clipper exists."""

from typing import Any

import torch

from distclip import ClipReport, GradClipper

# What a trainer owns: the clipper must take its optimizer and GradScaler, and its optimizer step takes no fused fold.
_TRAINER_OWNS = ("optimizer", "scaler", "fused")


class ClipperSteps:
    """The clipping part of a trainer callback; the callback calls `_start` in its ``__init__`` and `_clip_step`
    in its before-optimizer-step hook. ``clipper`` is the `distclip.GradClipper`, ``last_report`` the last
    step's `distclip.ClipReport`."""

    def _start(self, max_norm: float, norm_type: float | str, prefix: str, options: dict[str, Any],
               trainer: str) -> None:
        taken = sorted(set(options) & set(_TRAINER_OWNS))
        if taken:
            raise ValueError(f"distclip: under {trainer} the optimizer and GradScaler are {trainer}'s; drop {taken}")
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.prefix = prefix
        self.options = options
        self.clipper: GradClipper | None = None
        self.last_report: ClipReport | None = None
        self._saved: dict[str, Any] | None = None

    def _clip_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> ClipReport:
        """Clip ``model``'s gradients for ``optimizer``'s step (building the clipper on the first step); if the
        report says to skip the step, leave the optimizer's parameters without gradients, so that its step
        passes over all of them (reading the skip flag synchronises, only if the clipper can skip)."""
        if self.clipper is None:
            self.clipper = GradClipper(model, self.max_norm, self.norm_type, scaler=scaler, optimizer=optimizer,
                                       **self.options)
            if self._saved is not None:
                self.clipper.load_state_dict(self._saved)
        elif optimizer is not self.clipper.optimizer:
            raise ValueError("distclip: GradClipperCallback clips for one optimizer; this model steps several")
        report = self.last_report = self.clipper.clip_()
        if report.skipped:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
        return report

    def state_dict(self) -> dict[str, Any]:
        """The clipper's `distclip.GradClipper.state_dict` (what was loaded, before the first step)."""
        return self.clipper.state_dict() if self.clipper is not None else dict(self._saved or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict` (now, or when the clipper is built on the first step); an empty one is none."""
        if not state_dict:
            return
        if self.clipper is not None:
            self.clipper.load_state_dict(state_dict)
        else:
            self._saved = state_dict
