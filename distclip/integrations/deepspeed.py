r"""DeepSpeed: clip a DeepSpeed engine's gradients through distclip, for ZeRO stages 0 to 3.

After `attach`, every ``engine.step()`` at a gradient-accumulation boundary clips the gradients by
distclip's norm of the whole averaged gradient (any p > 0, or inf), with no change to the training
loop. Where the norm comes from depends on how DeepSpeed holds the gradients at step time:

- ZeRO 1 and 2 (``DeepSpeedZeroOptimizer``), ZeRO 3 (``DeepSpeedZeroOptimizer_Stage3``): each rank owns a
  partition of the averaged gradients. `distclip.get_total_norm` over the optimizer's data-parallel group
  takes the place of DeepSpeed's L2 norm inside its ``step()``, so DeepSpeed's overflow check, loss scaling and
  ``get_global_grad_norm()`` all see distclip's norm (one all_reduce, as before).
- ZeRO 1 with bf16 parameters and fp32 gradient accumulation (``BF16_Optimizer``): the fp32 gradient partitions
  the wrapped optimizer steps on, over the data-parallel group.
- Stage 0 (the torch optimizer itself for fp32, ``FP16_UnfusedOptimizer`` for bf16): the gradients are
  replicated by DeepSpeed's all-reduce, so every rank takes the local norm of the fp32 gradients the optimizer
  steps on, with no collective. Stage 0 with fp16 is refused: there DeepSpeed 0.19 divides gradients by a loss
  scale it never applied (deepspeedai/DeepSpeed#8393), so no gradient is the unscaled one.

The clip itself is `distclip.clip_grads_with_norm_` in a step pre-hook of the torch optimizer that
DeepSpeed wraps, on the unscaled fp32 gradients it is about to consume. DeepSpeed's own clipping is off for
the duration of each step; steps that DeepSpeed skips (fp16 overflow) are skipped as before and report inf.

This is the one module that reaches into DeepSpeed beyond its documented API (the optimizer wrappers' norm
methods and attributes in ``_INTERNALS``), so `attach` refuses DeepSpeed versions and configurations it
was not tested with, and internals that are missing, rather than clip by a wrong norm.
"""

import functools
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import distclip
from distclip._clip import arguments

# The DeepSpeed releases the tests ran on, as [low, high). Keep setup.cfg's `deepspeed` extra the same.
TESTED_VERSIONS = ((0, 19, 8), (0, 20, 0))
_INSTALL = 'pip install "distclip[deepspeed]"'

# The DeepSpeed optimizer attributes this module reads or replaces, by wrapper class. A release that renames one
# must fail here, not leave DeepSpeed computing its own norm with clipping switched off.
_STEP = ("step", "optimizer", "clip_grad")
_ZERO = (*_STEP, "averaged_gradients", "dp_process_group", "loss_scale")
_INTERNALS = {
    "DeepSpeedZeroOptimizer": (*_ZERO, "scaled_global_norm"),
    "DeepSpeedZeroOptimizer_Stage3": (*_ZERO, "_get_norm_groups"),
    "BF16_Optimizer": (*_STEP, "dp_process_group"),
    "FP16_UnfusedOptimizer": (*_STEP, "fused_lamb_legacy"),
    "DeepSpeedEngine": ("clip_fp32_gradients", "_global_grad_norm"),  # stage 0 fp32: no wrapper
}

__all__ = ["TESTED_VERSIONS", "ClipHandle", "attach"]

_attached: "weakref.WeakKeyDictionary[Any, ClipHandle]" = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class ClipHandle:
    """What `attach` returns. ``last_norm``: the pre-clip norm of the last optimizer step (``None``
    before the first; inf for a step DeepSpeed skipped); ``detach()``: give the engine its own clipping back.
    """

    max_norm: float
    norm_type: float
    error_if_nonfinite: bool
    last_norm: Tensor | float | None = None
    _norm: Tensor | None = field(default=None, repr=False)  # this step's unscaled norm, for the clip
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def detach(self) -> None:
        """Restore the engine's own clipping and norm; calling it again does nothing."""
        while self._undo:
            self._undo.pop()()


def attach(engine: Any, max_norm: float, norm_type: float | str = 2.0, error_if_nonfinite: bool = False) -> ClipHandle:
    r"""Clip ``engine``'s gradients through distclip at every optimizer step, until ``detach()``.

    The gradients are scaled by `\min(\text{max\_norm} / (\text{norm} + 10^{-6}), 1)`, where norm is the
    ``norm_type``-norm of the whole gradient averaged over the data-parallel ranks (of the unscaled gradients
    under fp16 loss scaling), the same on every rank. It replaces the config's ``gradient_clipping`` while
    attached, and ``engine.get_global_grad_norm()`` reports it. For norm type 2 the result is DeepSpeed's own
    ``gradient_clipping``. Every rank must attach, with the same arguments.

    Args:
        engine: the engine returned by ``deepspeed.initialize``.
        max_norm: the largest norm the gradients keep; non-negative (inf: report the norm, never clip).
        norm_type: any p > 0, or inf / ``'inf'`` (not -inf: ZeRO pads partitions with zeros).
        error_if_nonfinite: raise ``RuntimeError`` on every rank, before any gradient changes, when the norm is
            NaN or inf. Under fp16 such steps are overflow steps, which DeepSpeed skips before any norm.

    Raises:
        ImportError: DeepSpeed is not installed, or its version is outside `TESTED_VERSIONS`.
        NotImplementedError: a configuration this integration does not handle (offload, MoE, model or pipeline
            parallelism, torch autocast, ...); the message names it.
    """
    _check_version(_import_deepspeed().__version__)
    handle = ClipHandle(
        arguments.max_norm_value(max_norm, sharded=True),
        arguments.norm_order(norm_type, sharded=True, zero_padded=True),
        bool(error_if_nonfinite),
    )
    if engine in _attached:
        raise RuntimeError("distclip: this engine is already attached; call detach() on its handle first")
    install = _installer(engine)
    handle._undo.append(lambda: _attached.pop(engine, None))
    _attached[engine] = handle
    try:
        install(engine, handle)
    except BaseException:
        handle.detach()
        raise
    return handle


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(f"distclip.integrations.deepspeed needs DeepSpeed: {_INSTALL}") from err
    return deepspeed


def _check_version(version: str) -> None:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    low, high = TESTED_VERSIONS
    if match is None or not low <= tuple(int(n) for n in match.groups()) < high:
        raise ImportError(
            f"distclip.integrations.deepspeed was tested with DeepSpeed >={_dotted(low)},<{_dotted(high)} and uses "
            f"its optimizers' internals, which change between releases; found DeepSpeed {version}. Install a "
            f"tested one: {_INSTALL}"
        )


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _installer(engine: Any) -> Callable[[Any, ClipHandle], None]:
    """How to attach to ``engine``, from the optimizer DeepSpeed built; raises for what was not tested."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    reasons = _unsupported(engine)
    # Exact types: subclasses (ZenFlow, SuperOffload) override the steps these hooks rely on.
    kind = type(optimizer)
    if kind is DeepSpeedZeroOptimizer and not engine.zero_compute_grad_norm():
        reasons.append("zero_optimization.compute_grad_norm=false (DeepSpeed then takes no norm to replace)")
    elif kind is FP16_UnfusedOptimizer and engine.fp16_enabled():
        reasons.append(
            "fp16 without ZeRO: DeepSpeed's engine.backward() does not scale the loss on stage 0 while its optimizer "
            "divides the gradients by the loss scale (deepspeedai/DeepSpeed#8393), so there is no unscaled gradient "
            "to take the norm of; use ZeRO 1-3 or bf16"
        )
    elif kind is FP16_UnfusedOptimizer and optimizer.fused_lamb_legacy:
        reasons.append("the legacy fused LAMB step")
    elif kind not in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer, FP16_UnfusedOptimizer):
        if not (optimizer is engine.basic_optimizer and isinstance(optimizer, torch.optim.Optimizer)):
            reasons.append(f"the optimizer wrapper {kind.__name__}")
    patched = optimizer if kind.__name__ in _INTERNALS else engine
    missing = [name for name in _INTERNALS.get(type(patched).__name__, ()) if not hasattr(patched, name)]
    if missing:
        reasons.append(f"this DeepSpeed's {type(patched).__name__}, which lacks {', '.join(missing)}")
    if reasons:
        raise NotImplementedError(
            "distclip.integrations.deepspeed does not support " + "; ".join(reasons) + ". Supported: ZeRO 1-3 "
            "with fp32, bf16 or fp16 and ZeRO 0 with fp32 or bf16, data parallelism, a torch optimizer, no offload."
        )
    if kind is DeepSpeedZeroOptimizer:
        return functools.partial(_install_zero, norm_method="scaled_global_norm", as_groups=False)
    if kind is DeepSpeedZeroOptimizer_Stage3:
        return functools.partial(_install_zero, norm_method="_get_norm_groups", as_groups=True)
    if kind is BF16_Optimizer:
        return functools.partial(_install_single_step, group=optimizer.dp_process_group)
    if kind is FP16_UnfusedOptimizer:
        return functools.partial(_install_single_step, group=None)
    return _install_fp32_stage0


def _unsupported(engine: Any) -> list[str]:
    """The parts of ``engine``'s configuration whose gradient layout this module does not translate."""
    checks = [
        (engine.mpu is not None, "model/tensor parallelism (an mpu)"),
        (engine.has_moe_layers, "mixture-of-experts layers"),
        (engine.pipeline_parallelism, "pipeline parallelism"),
        (engine.zero_use_cpu_optimizer(), "optimizer offload"),
        (_offloads_params(engine), "parameter offload"),
        (engine.torch_autocast_enabled(), "torch_autocast"),
        (getattr(engine, "zenflow", False), "ZenFlow"),
        (any(getattr(p, "use_muon", False) for p in engine.module.parameters()), "the Muon optimizer"),
    ]
    return [reason for unsupported, reason in checks if unsupported]


def _offloads_params(engine: Any) -> bool:
    config = engine.zero_offload_param()
    return config is not None and config.device != "none"


def _install_zero(engine: Any, handle: ClipHandle, norm_method: str, as_groups: bool) -> None:
    """ZeRO 1, 2, 3: distclip's norm of this rank's partitions replaces DeepSpeed's, and the clip uses it."""
    optimizer = engine.optimizer

    def scaled_norm() -> Tensor:
        # DeepSpeed's averaged_gradients: this rank's disjoint pieces of the averaged, loss-scaled gradient.
        pieces = [g for grads in optimizer.averaged_gradients.values() if grads is not None for g in grads]
        norm = distclip.get_total_norm(
            pieces, handle.norm_type, handle.error_if_nonfinite, group=optimizer.dp_process_group
        )
        handle._norm = norm / optimizer.loss_scale
        return norm

    # DeepSpeed divides the returned norm by its loss scale for get_global_grad_norm() and marks a non-finite one
    # as an overflow; ZeRO 3 combines a list of per-group norms, here a list of one.
    replacement = (lambda: [scaled_norm()]) if as_groups else (lambda norm_type=2: scaled_norm())
    handle._undo.append(_override(optimizer, norm_method, replacement))
    handle._undo.append(_wrap_step(optimizer, handle))
    handle._undo.append(optimizer.optimizer.register_step_pre_hook(_clip_hook(handle)).remove)


def _install_single_step(engine: Any, handle: ClipHandle, group: Any) -> None:
    """BF16_Optimizer, stage 0 bf16: DeepSpeed steps the wrapped optimizer once, on all of this rank's fp32
    gradients (its partitions over ``group``; for ``None``, copies of the replicated gradients)."""
    optimizer = engine.optimizer
    handle._undo.append(_wrap_step(optimizer, handle))
    handle._undo.append(optimizer.optimizer.register_step_pre_hook(_norm_and_clip_hook(handle, group)).remove)


def _install_fp32_stage0(engine: Any, handle: ClipHandle) -> None:
    """Stage 0 fp32: the engine steps the torch optimizer on the replicated gradients itself."""

    def publish(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # A torch optimizer has no _global_grad_norm for the engine to copy; set what get_global_grad_norm reads.
        engine._global_grad_norm = handle.last_norm = handle._norm

    # The engine's own stage-0 clip runs outside the optimizer's step, when the config has gradient_clipping.
    handle._undo.append(_override(engine, "clip_fp32_gradients", _skip_engine_clip))
    # DeepSpeed never sets this norm on stage 0 fp32 (None): after detach it reports what it did before attach.
    handle._undo.append(_override(engine, "_global_grad_norm", engine._global_grad_norm))
    handle._undo.append(engine.optimizer.register_step_pre_hook(_norm_and_clip_hook(handle, None)).remove)
    handle._undo.append(engine.optimizer.register_step_pre_hook(publish).remove)


def _skip_engine_clip() -> None:
    """Stands in for ``engine.clip_fp32_gradients`` while attached: distclip clips in the optimizer's step."""


def _norm_and_clip_hook(handle: ClipHandle, group: Any) -> Callable[..., None]:
    """A step pre-hook that takes the norm of the gradients the optimizer steps on (pieces over ``group``,
    or replicated for ``None``) and clips them by it."""

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for p in _params(optimizer) if p.grad is not None]
        handle._norm = distclip.get_total_norm(grads, handle.norm_type, handle.error_if_nonfinite, group=group)
        distclip.clip_grads_with_norm_(_params(optimizer), handle.max_norm, handle._norm)

    return hook


def _clip_hook(handle: ClipHandle) -> Callable[..., None]:
    """A step pre-hook that clips the gradients the optimizer steps on by this step's norm.

    ZeRO steps the wrapped optimizer once per parameter group (sub-group in ZeRO 3), with only that group in
    ``param_groups``, so each call scales gradients no other call sees.
    """

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        distclip.clip_grads_with_norm_(_params(optimizer), handle.max_norm, handle._norm)

    return hook


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _wrap_step(optimizer: Any, handle: ClipHandle) -> Callable[[], None]:
    """Wrap a DeepSpeed optimizer's ``step``: its own clipping off during the step, and the step's norm (inf
    for a skipped step) reported where ``engine.get_global_grad_norm()`` reads it. Returns the undo."""
    step = optimizer.step

    @functools.wraps(step)
    def clipped_step(*args: Any, **kwargs: Any) -> Any:
        # clip_grad is switched off only inside the step, so checkpoints save and load the configured value.
        clip_grad, optimizer.clip_grad = optimizer.clip_grad, 0.0
        handle._norm = None
        try:
            result = step(*args, **kwargs)
        finally:
            optimizer.clip_grad = clip_grad
        if handle._norm is not None:
            optimizer._global_grad_norm = handle._norm
        handle.last_norm = optimizer._global_grad_norm
        return result

    return _override(optimizer, "step", clipped_step)


def _override(obj: Any, name: str, value: Any) -> Callable[[], None]:
    """Set ``name`` on the instance ``obj``; return the undo, which restores what the instance had."""
    had, previous = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, value)

    def undo() -> None:
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)

    return undo
