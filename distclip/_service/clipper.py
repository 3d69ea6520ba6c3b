r"""GradClipper: the clipping service of a training loop, over the clip's stages (``distclip/_clip/``).

Every `GradClipper.clip_` runs, top to bottom:

    AMP unscale (amp) -> layout -> total norm (pipeline: one reduction when sharded) -> non-finite policy
        -> per-unit norms (units, on request) -> thresholds (policies) -> coefficient -> scaling, or AGC's
        unit-wise scaling (agc), or nothing (fused: the optimizer's kernel scales) -> report (report)

Everything it computes stays on the gradients' device, as tensors: the thresholds and the decision to skip are
functions of the global norm, which is the same on every rank, so every rank takes the same decisions and
holds the same policy state without any host synchronisation. A `ClipReport` is read by the user (or a
logger) when it wants the numbers.
"""

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from distclip._clip import arguments, coefficient, layout, modules, pipeline, reduction, scaling
from distclip._clip.layout import Layout
from distclip._service import agc, amp, policies
from distclip._service.agc import AGC
from distclip._service.policies import Policy
from distclip._service.report import ClipReport
from distclip._service.units import Units, flat_parameters

_NONFINITE = ("propagate", "raise", "skip")
_UNITS = ("parameter", "module")


class GradClipper:
    r"""Clip a model's gradients every step, with telemetry, adaptive thresholds and skipping, the same on every
    rank and without host synchronisation.

    Args:
        target: a module, whose layout is read from its wrapper as `distclip.clip_module_grad_norm_`
            does (plain, DDP, FSDP1, FSDP2/DTensor), or parameters as `distclip.clip_grad_norm_` takes
            them (tensors, declared ``{"params": [...], "replicated_over": group}`` groups).
        max_norm: the fixed clip threshold (torch's semantics); ``inf`` leaves clipping to the policies.
        norm_type: p of the norms: a positive float, ``inf``, or ``-inf`` (2 with AGC, whose unit norms are
            2-norms). Checked with the sharded rules whatever the layout, as ``max_norm`` is.
        group: with parameters, the group they are sharded over (as ``clip_grad_norm_``'s ``group=``; left
            out: this process's gradients alone).
        policy: one policy or a list: `distclip.AutoClip`, `distclip.ZClip` (clip thresholds;
            the smallest threshold applies), `distclip.SpikeSkip` (skips), `distclip.AGC`
            (unit-wise, at most one).
        nonfinite: what a NaN or inf norm does. ``"propagate"``: torch's behaviour, the coefficient
            ``threshold / (norm + 1e-6)`` of the non-finite norm: a NaN norm makes every gradient NaN; an inf
            norm makes every finite element 0 (and the infinite ones NaN) under a finite threshold, and every
            gradient NaN under an infinite one (``max_norm=inf``: inf / inf is NaN). ``"raise"``:
            ``RuntimeError`` on every rank, before any gradient changes (this reads the norm on the host: the
            one policy that synchronises). ``"skip"``: the step is skipped on every rank and
            the gradients are left as they are, for inspection.
        norms: ``"parameter"`` or ``"module"`` (the module that owns each parameter; needs a module target)
            to report pre-clip per-unit norms. Cost: a few small kernels per unit, and in sharded layouts one
            ``all_reduce`` of ``16 * units * world_size`` bytes.
        scaler: a ``torch.amp.GradScaler``: the gradients are unscaled (``scaler.unscale_(optimizer)``) before
            they are measured; without ``optimizer`` they must already be.
        optimizer: the optimizer that `step` steps (needed with ``scaler`` to unscale, and with
            ``fused``).
        fused: fold the coefficient into torch's fused Adam, AdamW or SGD (``fused=True``): `clip_`
            leaves the gradients alone, and `step` passes ``grad_scale = 1 / coefficient`` and the skip
            flag as ``found_inf`` to the fused kernel, which divides the gradients and skips the update on the
            device. The parameters after the step equal clip-then-step up to float rounding (a division by
            ``1 / coefficient`` instead of a multiplication by it).
        foreach: as in `distclip.clip_grad_norm_`.

    Collectives per `clip_` in a sharded layout: one for the norm, one more for per-unit norms, and with
    AGC one per group that row-sharded tensors need plus one for the post-clip norm.
    """

    def __init__(
        self,
        target: torch.nn.Module | Iterable[Any],
        max_norm: float,
        norm_type: float | str = 2.0,
        *,
        group: Any = arguments.NO_GROUP,
        policy: Policy | AGC | Sequence[Policy | AGC] | None = None,
        nonfinite: str = "propagate",
        norms: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        fused: bool = False,
        foreach: bool | None = None,
    ) -> None:
        group = arguments.process_group(group)
        if isinstance(target, torch.nn.Module):
            if group is not None:
                raise ValueError(
                    "distclip: a module's layout is read from its wrapper; to give group=, pass its parameters"
                )
            self._module: torch.nn.Module | None = target
            self._parameters: list[Any] = []
        else:
            self._module = None
            self._parameters = _target_parameters(target)
            if group is not None:
                reduction.membership(group)  # a clear error now for what is not a group this rank is in
        self._group = group
        self.max_norm = arguments.max_norm_value(max_norm, sharded=True)
        self.norm_type = norm_type
        self._p = arguments.norm_order(norm_type, sharded=True)
        self.foreach = foreach
        self._policies, self._agc = _split_policies(policy)
        self.nonfinite = arguments.choice("GradClipper", "nonfinite", nonfinite, _NONFINITE)
        self.scaler = arguments.of_type(scaler, "GradClipper", "scaler", "a torch.amp.GradScaler or None",
                                         torch.amp.GradScaler)
        self.optimizer = _optimizer(optimizer)
        self.fused = fused
        self._check_options(norms)
        self._units = Units.of(self._module, self._parameters, norms) if norms else None
        self._may_skip = nonfinite == "skip" or any(p.action == "skip" for p in self._policies)
        self._counters: dict[str, Tensor] | None = None
        self._arguments_checked = False

    def _check_options(self, norms: str | None) -> None:
        arguments.choice("GradClipper", "norms", norms, (None, *_UNITS))
        if norms == "module" and self._module is None:
            raise ValueError('distclip: norms="module" needs a module target, to know which module owns what')
        if (norms or self._agc) and self._module is not None and modules.is_fsdp1(self._module):
            raise ValueError(
                "distclip: per-unit norms and AGC need each parameter's own gradient, and FSDP1 keeps this "
                "rank's shard of flat parameters (cut at arbitrary offsets, also with use_orig_params=True): "
                "use FSDP2 (fully_shard), or clip without them"
            )
        if self.scaler is not None and self.scaler.is_enabled() and self.nonfinite == "raise":
            raise ValueError(
                'distclip: nonfinite="raise" with an enabled GradScaler would raise on the overflows that loss '
                'scaling expects and handles; use "propagate" (the scaler skips those steps) or "skip"'
            )
        if self.fused:
            optimizer = self.optimizer
            if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)) or not all(
                g.get("fused") for g in optimizer.param_groups
            ):
                raise ValueError(
                    "distclip: fused=True folds the coefficient into torch's fused kernels: pass optimizer= a "
                    "torch.optim.Adam, AdamW or SGD built with fused=True"
                )
            if self._agc:
                raise ValueError("distclip: AGC scales each unit by its own factor, which one fused grad_scale cannot")
        if self._agc and self._p != 2:
            raise ValueError(
                f"distclip: AGC's unit norms are 2-norms (the paper's), so GradClipper takes policy=AGC(...) with "
                f"norm_type=2 only, got norm_type={self.norm_type!r}. (timm's adaptive_clip_grad takes the unit "
                "norms' order from its norm_type; distclip does not: see docs/clipper.md)"
            )

    @torch.no_grad()
    def clip_(self) -> ClipReport:
        """Measure, decide and clip this step's gradients (in place); return the `ClipReport`.

        No host synchronisation, except: ``nonfinite="raise"`` reads the norm, and in a sharded layout the
        first call reads the gathered arguments once, to check that every rank built its clipper with the same
        ``norm_type`` and ``max_norm`` (every rank raises together if not). Every rank of the group must call.
        """
        self._unscale()
        if self._module is not None:
            parameters, group = modules.parameters_of(self._module)
        else:
            parameters, group = self._parameters, self._group
        laid_out = layout.of_parameters(parameters, group)
        norm = self._total_norm(laid_out)
        nonfinite = ~torch.isfinite(norm)
        if self.nonfinite == "raise" and nonfinite:
            raise RuntimeError(
                f"distclip: the total norm of order {self._p} of the gradients is non-finite ({float(norm)}); "
                'nonfinite="raise" stops here on every rank, before any gradient changed'
            )
        unit_norms = self._units.norms(parameters, laid_out, self._p, self.foreach, norm.device) if self._units else None
        decision = policies.decide(self._policies, norm, self.max_norm)
        skip = ~nonfinite & (norm > decision.skip_threshold)  # a non-finite norm: nonfinite= decides
        if self.nonfinite == "skip":
            skip = skip | nonfinite
        if self._policies:
            factor = coefficient.clip_coefficient(decision.clip_threshold, norm.to(torch.float64)).to(norm.dtype)
        else:
            factor = coefficient.clip_coefficient(self.max_norm, norm)  # bitwise torch's, on one process
        if self._may_skip:
            factor = torch.where(skip, 1.0, factor)
        if self._agc:
            post_norm = self._agc_scale_(parameters, laid_out, factor, skip)
            clipped = (factor < 1) | (post_norm < norm)
        else:
            if laid_out.grads and not self.fused:
                scaling.scale_(laid_out.scaled_groups, factor, self.foreach,
                               laid_out.scaled_sizes if laid_out.sharded else None)
            post_norm = norm * factor
            clipped = factor < 1
        counters = self._count(clipped, skip, norm.device)
        return ClipReport(
            norm=norm,
            threshold=decision.clip_threshold,
            coefficient=factor,
            clipped=clipped,
            post_norm=post_norm,
            nonfinite=nonfinite,
            skip=skip,
            skip_threshold=decision.skip_threshold,
            steps=counters["steps"],
            clipped_steps=counters["clipped_steps"],
            skipped_steps=counters["skipped_steps"],
            unit_names=self._units.names if self._units else (),
            unit_norms=unit_norms,
            may_skip=self._may_skip,
        )

    def step(self, report: ClipReport) -> None:
        """Step ``optimizer`` for this report as clip-then-step would, skipping the update if ``report.skip``.

        Fused (``fused=True``): the coefficient goes to the kernel as ``grad_scale = 1 / coefficient`` and the
        skip flag (with the GradScaler's overflow flag) as ``found_inf``; nothing is read on the host. Else the
        skip flag is read (one synchronisation, only if the clipper can skip) and the step is taken with
        ``scaler.step(optimizer)`` or ``optimizer.step()``. With a GradScaler, call ``scaler.update()`` after,
        as usual.
        """
        optimizer = self.optimizer
        if optimizer is None:
            raise ValueError("distclip: GradClipper.step() steps the optimizer given as optimizer=; none was")
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        if not self.fused:
            if report.skipped:
                return
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
            return
        found_inf = report.skip.to(torch.float32) if self._may_skip else None
        if scaler is not None:
            overflow = amp.overflow(scaler, optimizer, report.norm.device)
            found_inf = overflow if found_inf is None else torch.clamp(overflow + found_inf, max=1.0)
        optimizer.grad_scale = torch.reciprocal(report.coefficient).to(torch.float32)  # type: ignore[attr-defined]
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
        if scaler is not None:
            amp.mark_stepped(scaler, optimizer)

    def state_dict(self) -> dict[str, Any]:
        """The counters and every threshold policy's state, as tensors; `load_state_dict` restores them,
        so a resumed run takes the same decisions as the uninterrupted one."""
        counters = self._counters if self._counters is not None else _fresh_counters(torch.device("cpu"))
        return {
            "counters": {name: value.clone() for name, value in counters.items()},
            "policies": [{"type": type(p).__name__, "state": p.state_dict()} for p in self._policies],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict` of a clipper built with the same policies."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"counters", "policies"}:
            shown = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                "distclip: GradClipper.load_state_dict takes what GradClipper.state_dict() returned, a dict with "
                f"the keys ['counters', 'policies'], got {shown}"
            )
        saved = [entry["type"] for entry in state_dict["policies"]]
        built = [type(p).__name__ for p in self._policies]
        if saved != built:
            raise ValueError(f"distclip: the state is of a clipper with the policies {saved}, this one has {built}")
        for policy, entry in zip(self._policies, state_dict["policies"]):
            policy.load_state_dict(entry["state"])
        device = next(iter(self._counters.values())).device if self._counters else torch.device("cpu")
        fresh = _fresh_counters(device)
        if set(state_dict["counters"]) != set(fresh):
            raise ValueError(
                f"distclip: the clipper's counters are {sorted(fresh)}, got {sorted(state_dict['counters'])}"
            )
        self._counters = {name: state_dict["counters"][name].to(device, torch.int64, copy=True) for name in fresh}

    def _unscale(self) -> None:
        """Unscale the gradients with the GradScaler, or check that they are; no synchronisation."""
        if self.scaler is not None and self.scaler.is_enabled():
            amp.unscale_(self.scaler, self.optimizer)

    def _total_norm(self, laid_out: Layout) -> Tensor:
        """The total norm through the clip's pipeline. In a sharded layout only the first call checks that
        the ranks' arguments agree, which reads them on the host; the clipper's arguments are fixed."""
        total = pipeline.total_norm_of(
            laid_out, self.norm_type, False, self.foreach, self.max_norm, check_arguments=not self._arguments_checked
        )
        self._arguments_checked = laid_out.sharded
        return total

    def _agc_scale_(self, parameters: list[Any], laid_out: Layout, coefficient: Tensor, skip: Tensor) -> Tensor:
        """Scale every unit by the smaller of its AGC factor and ``coefficient`` (1 on a skipped step); return
        the post-clip total norm."""
        global_factor = coefficient.to(torch.float64)
        for grad, factors in agc.unit_factors(self._agc, flat_parameters(parameters)):
            factor = torch.minimum(factors.to(global_factor.device), global_factor)
            if self._may_skip:
                factor = torch.where(skip, 1.0, factor)
            grad.mul_(factor.to(grad.device, grad.dtype))
        return self._total_norm(laid_out)

    def _count(self, clipped: Tensor, skip: Tensor, device: torch.device) -> dict[str, Tensor]:
        counters = self._counters if self._counters is not None else _fresh_counters(device)
        self._counters = {
            "steps": counters["steps"].to(device) + 1,
            "clipped_steps": counters["clipped_steps"].to(device) + clipped.to(torch.int64),
            "skipped_steps": counters["skipped_steps"].to(device) + skip.to(torch.int64),
        }
        return self._counters


def _target_parameters(target: Any) -> list[Any]:
    """The elements of a parameters target; a ``TypeError`` for what cannot be one."""
    expected = (
        'a torch.nn.Module, or parameters as clip_grad_norm_ takes them (tensors, or {"params": [...], '
        '"replicated_over": group} dicts)'
    )
    if isinstance(target, (str, bytes, dict)) or not isinstance(target, Iterable):
        raise TypeError(
            f"distclip: GradClipper target must be {expected}, got {target!r} of type {type(target).__name__}"
        )
    parameters = layout.as_list(target, "target")
    for i, item in enumerate(parameters):
        if type(item) is not dict and not isinstance(item, Tensor):
            raise TypeError(
                f"distclip: GradClipper target must be {expected}; its element {i} is {item!r} of type "
                f"{type(item).__name__}"
            )
    return parameters


def _optimizer(optimizer: Any) -> Any:
    """``optimizer`` if it is None or steps like a torch optimizer (``step()`` and ``param_groups``)."""
    if optimizer is None or (callable(getattr(optimizer, "step", None)) and hasattr(optimizer, "param_groups")):
        return optimizer
    raise TypeError(
        "distclip: GradClipper optimizer must be a torch.optim.Optimizer (anything with step() and param_groups) "
        f"or None, got {optimizer!r} of type {type(optimizer).__name__}"
    )


def _split_policies(policy: Any) -> tuple[list[Policy], AGC | None]:
    policies = [] if policy is None else list(policy) if isinstance(policy, (list, tuple)) else [policy]
    for p in policies:
        if not isinstance(p, (Policy, AGC)):
            raise TypeError(
                f"distclip: a policy is an AutoClip, ZClip, SpikeSkip or AGC instance, got {type(p).__name__}"
            )
    agc = [p for p in policies if isinstance(p, AGC)]
    if len(agc) > 1:
        raise ValueError("distclip: at most one AGC policy")
    return [p for p in policies if isinstance(p, Policy)], (agc[0] if agc else None)


def _fresh_counters(device: torch.device) -> dict[str, Tensor]:
    names = ("steps", "clipped_steps", "skipped_steps")
    return {name: torch.zeros((), dtype=torch.int64, device=device) for name in names}
