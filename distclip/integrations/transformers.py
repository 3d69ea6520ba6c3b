"""Hugging Face ``transformers``: clip through a `distclip.GradClipper` in ``on_pre_optimizer_step``.

The Trainer calls the hook at each gradient-accumulation boundary, right before ``optimizer.step()``, with the
gradients already unscaled under fp16 AMP (the Trainer measures them through Accelerate, which unscales). The
callback clips ``model`` (the Trainer's model: plain, or the DDP/FSDP2 replica's module), keeps the report in
``last_report``, adds it to the Trainer's ``logs`` in ``on_log`` (the last step's values; the reporting
integrations of ``report_to`` run before user callbacks, so to have the values reach them, put this callback
first: ``trainer.callback_handler.callbacks.insert(0, callback)``), and skips a step the report says to skip
by leaving the parameters without gradients for that step; reading the skip flag synchronises once, and only
if the clipper can skip.

Pass ``max_grad_norm=0`` in ``TrainingArguments``: the Trainer's own clipping would run before this one. The
clipper's state is ``callback.state_dict()`` / ``load_state_dict()``: save it beside your checkpoints (the
Trainer's JSON callback state cannot hold the policies' tensors). DeepSpeed engines clip themselves: use
``distclip.integrations.deepspeed`` there.
"""

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from distclip.integrations._callback import ClipperSteps


class GradClipperCallback(ClipperSteps, TrainerCallback):
    """Clip every optimizer step with a `distclip.GradClipper` built on the first step.

    Args:
        max_norm: as `distclip.GradClipper`'s.
        norm_type: as `distclip.GradClipper`'s.
        prefix: the prefix of the names added to the logs.
        **options: the clipper's other keyword arguments (``policy``, ``nonfinite``, ``norms``, ``foreach``);
            the optimizer and GradScaler are the Trainer's.
    """

    def __init__(self, max_norm: float, norm_type: float | str = 2.0, *, prefix: str = "grad/", **options: Any) -> None:
        self._start(max_norm, norm_type, prefix, options, "the Trainer")

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(
                "distclip: TrainingArguments.max_grad_norm would clip before GradClipperCallback; pass max_grad_norm=0"
            )

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = kwargs["optimizer"]
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
        self._clip_step(kwargs["model"], inner, getattr(optimizer, "scaler", None))

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, float] | None = None, **kwargs: Any,
    ) -> None:
        if logs is not None and self.last_report is not None and "loss" in logs:
            logs.update(self.last_report.as_dict(self.prefix, host=True))
