r"""GradClipper: the clipping service of a training loop, over the stages of ``_clip_grad``.

Every `GradClipper.clip_` runs, top to bottom:

    AMP unscale (GradScaler) -> layout -> total norm (one reduction when sharded) -> non-finite policy
        -> per-unit norms (on request) -> thresholds (_policies) -> coefficient -> scaling, or AGC's
        unit-wise scaling (_agc), or nothing (fused: the optimizer's kernel scales) -> report

Everything it computes stays on the gradients' device, as tensors: the thresholds and the decision to skip are
functions of the global norm, which is the same on every rank, so every rank takes the same decisions and
holds the same policy state without any host synchronisation. A `ClipReport` is read by the user (or a
logger) when it wants the numbers.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distclip import _agc, _arguments, _clip_grad, _coefficient, _layout, _partials, _policies, _reduction, _scaling
from distclip import _total_norm
from distclip._agc import AGC
from distclip._module import _is_fsdp1, _layout_of
from distclip._policies import Policy

_F64 = torch.float64
_NONFINITE = ("propagate", "raise", "skip")
_UNITS = ("parameter", "module")
# Module names that wrappers insert into parameter names; per-unit norms are named without them.
_WRAPPER_NAMES = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


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
        return self.clipped_steps.to(_F64) / self.steps.to(_F64)

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
        scalars = [v.to(self.norm.device, _F64).reshape(1) for v in values.values()]
        if self.unit_norms is not None:
            scalars.append(self.unit_norms.to(self.norm.device, _F64))
        stacked = torch.cat(scalars)
        return dict(zip(names, stacked.tolist() if host else stacked.unbind()))


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
        group: Any = _arguments.NO_GROUP,
        policy: Policy | AGC | Sequence[Policy | AGC] | None = None,
        nonfinite: str = "propagate",
        norms: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        fused: bool = False,
        foreach: bool | None = None,
    ) -> None:
        group = _arguments.process_group(group)
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
                _reduction.membership(group)  # a clear error now for what is not a group this rank is in
        self._group = group
        self.max_norm = _arguments.max_norm_value(max_norm, sharded=True)
        self.norm_type = norm_type
        self._p = _arguments.norm_order(norm_type, sharded=True)
        self.foreach = foreach
        self._policies, self._agc = _split_policies(policy)
        self.nonfinite = _arguments.choice("GradClipper", "nonfinite", nonfinite, _NONFINITE)
        self.scaler = _arguments.of_type(scaler, "GradClipper", "scaler", "a torch.amp.GradScaler or None",
                                         torch.amp.GradScaler)
        self.optimizer = _optimizer(optimizer)
        self.fused = fused
        self._check_options(norms)
        self._units = _Units.of(self._module, self._parameters, norms) if norms else None
        self._may_skip = nonfinite == "skip" or any(p.action == "skip" for p in self._policies)
        self._counters: dict[str, Tensor] | None = None
        self._arguments_checked = False

    def _check_options(self, norms: str | None) -> None:
        _arguments.choice("GradClipper", "norms", norms, (None, *_UNITS))
        if norms == "module" and self._module is None:
            raise ValueError('distclip: norms="module" needs a module target, to know which module owns what')
        if (norms or self._agc) and self._module is not None and _is_fsdp1(self._module):
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
        parameters, group = _layout_of(self._module) if self._module is not None else (self._parameters, self._group)
        layout = _layout.of_parameters(parameters, group)
        norm = self._total_norm(layout)
        nonfinite = ~torch.isfinite(norm)
        if self.nonfinite == "raise" and nonfinite:
            raise RuntimeError(
                f"distclip: the total norm of order {self._p} of the gradients is non-finite ({float(norm)}); "
                'nonfinite="raise" stops here on every rank, before any gradient changed'
            )
        unit_norms = self._units.norms(parameters, layout, self._p, self.foreach, norm.device) if self._units else None
        decision = _policies.decide(self._policies, norm, self.max_norm)
        skip = ~nonfinite & (norm > decision.skip_threshold)  # a non-finite norm: nonfinite= decides
        if self.nonfinite == "skip":
            skip = skip | nonfinite
        if self._policies:
            coefficient = _coefficient.clip_coefficient(decision.clip_threshold, norm.to(_F64)).to(norm.dtype)
        else:
            coefficient = _coefficient.clip_coefficient(self.max_norm, norm)  # bitwise torch's, on one process
        if self._may_skip:
            coefficient = torch.where(skip, 1.0, coefficient)
        if self._agc:
            post_norm = self._agc_scale_(parameters, layout, coefficient, skip)
            clipped = (coefficient < 1) | (post_norm < norm)
        else:
            if layout.grads and not self.fused:
                _scaling.scale_(layout.scaled, coefficient, self.foreach)
            post_norm = norm * coefficient
            clipped = coefficient < 1
        counters = self._count(clipped, skip, norm.device)
        return ClipReport(
            norm=norm,
            threshold=decision.clip_threshold,
            coefficient=coefficient,
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
            from torch.amp.grad_scaler import OptState

            state = scaler._per_optimizer_states[id(optimizer)]
            overflow = sum(
                (t.to(report.norm.device) for t in state["found_inf_per_device"].values()),
                torch.zeros((), dtype=torch.float32, device=report.norm.device),
            )
            found_inf = torch.clamp(overflow if found_inf is None else overflow + found_inf, max=1.0)
        optimizer.grad_scale = torch.reciprocal(report.coefficient).to(torch.float32)  # type: ignore[attr-defined]
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
        if scaler is not None:
            state["stage"] = OptState.STEPPED  # as scaler.step() leaves it: scaler.update() comes next

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
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return
        from torch.amp.grad_scaler import OptState

        states = scaler._per_optimizer_states
        if self.optimizer is None:
            if not any(state["stage"] is OptState.UNSCALED for state in states.values()):
                raise RuntimeError(
                    "distclip: the gradients are still scaled by the GradScaler (no scaler.unscale_(optimizer) "
                    "since the last update()), so their norm would be the scaled one: pass optimizer= to the "
                    "GradClipper to unscale them, or call scaler.unscale_(optimizer) before clip_()"
                )
            return
        stage = states[id(self.optimizer)]["stage"] if id(self.optimizer) in states else OptState.READY
        if stage is OptState.READY:
            scaler.unscale_(self.optimizer)
        elif stage is OptState.STEPPED:
            raise RuntimeError(
                "distclip: clip_() after scaler.step(optimizer) and before scaler.update(): clip before the step"
            )

    def _total_norm(self, layout: _layout.Layout) -> Tensor:
        """The total norm through ``_clip_grad``'s stages. In a sharded layout only the first call checks
        that the ranks' arguments agree, which reads them on the host; the clipper's arguments are fixed."""
        total = _clip_grad._total_norm_of(
            layout, self.norm_type, False, self.foreach, self.max_norm, check_arguments=not self._arguments_checked
        )
        self._arguments_checked = layout.sharded
        return total

    def _agc_scale_(self, parameters: list[Any], layout: _layout.Layout, coefficient: Tensor, skip: Tensor) -> Tensor:
        """Scale every unit by the smaller of its AGC factor and ``coefficient`` (1 on a skipped step); return
        the post-clip total norm."""
        global_factor = coefficient.to(_F64)
        for grad, factors in _agc.unit_factors(self._agc, _flat(parameters)):
            factor = torch.minimum(factors.to(global_factor.device), global_factor)
            if self._may_skip:
                factor = torch.where(skip, 1.0, factor)
            grad.mul_(factor.to(grad.device, grad.dtype))
        return self._total_norm(layout)

    def _count(self, clipped: Tensor, skip: Tensor, device: torch.device) -> dict[str, Tensor]:
        counters = self._counters if self._counters is not None else _fresh_counters(device)
        self._counters = {
            "steps": counters["steps"].to(device) + 1,
            "clipped_steps": counters["clipped_steps"].to(device) + clipped.to(torch.int64),
            "skipped_steps": counters["skipped_steps"].to(device) + skip.to(torch.int64),
        }
        return self._counters


@dataclass(frozen=True)
class _Units:
    """The units of per-unit norms: their names, and for each parameter (by identity) its unit's index."""

    names: tuple[str, ...]
    index_of: dict[int, int]

    @staticmethod
    def of(module: torch.nn.Module | None, parameters: list[Any], kind: str) -> "_Units":
        if module is None:
            named = [(str(i), p) for i, p in enumerate(_flat(parameters))]
        else:
            ddp = isinstance(module, torch.nn.parallel.DistributedDataParallel)
            named = [(_clean(name, ddp), p) for name, p in module.named_parameters()]
        names: dict[str, int] = {}
        index_of = {}
        for name, p in named:
            unit = name if kind == "parameter" else (name.rpartition(".")[0] or "root")
            index_of[id(p)] = names.setdefault(unit, len(names))
        return _Units(tuple(names), index_of)

    def norms(
        self, parameters: list[Any], layout: _layout.Layout, p: float, foreach: bool | None, device: torch.device
    ) -> Tensor:
        """The pre-clip p-norm of every unit, over the counted pieces (one reduction when sharded)."""
        counted = {id(t) for t in layout.counted}
        pieces: list[list[Tensor]] = [[] for _ in self.names]
        grads = iter(layout.grads)  # the layout lists the local gradients in the order of the parameters
        for param in _flat(parameters):
            if param.grad is None:
                continue
            grad = next(grads)
            if id(param) not in self.index_of:
                raise ValueError("distclip: a parameter that the clipper was not built with has a gradient")
            if id(grad) in counted:
                pieces[self.index_of[id(param)]].append(grad)
        if not layout.sharded:
            zero = torch.zeros((), device=device)
            return torch.stack([
                _total_norm.combine(_partials.tensor_norms(g, p, foreach), p, device) if g else zero for g in pieces
            ])
        wire = _reduction.wire_device(layout.group)
        rows = torch.cat([_partials.local_row(g, p, foreach, wire, ()) for g in pieces])
        gathered = _reduction.gather_rows(rows, layout.group).reshape(-1, len(pieces), 2)
        return torch.stack([_total_norm.from_rows(gathered[:, u], p) for u in range(len(pieces))]).to(device)


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
    parameters = _layout.as_list(target, "target")
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


def _flat(parameters: list[Any]) -> list[Any]:
    """Every parameter of ``parameters``, declared groups expanded, in the order the layout lists them."""
    flat: list[Any] = []
    for item in parameters:
        flat.extend(_layout.as_list(item["params"], "params") if type(item) is dict else [item])
    return flat


def _clean(name: str, ddp: bool) -> str:
    parts = [part for part in name.split(".") if part not in _WRAPPER_NAMES]
    return ".".join(parts[1:] if ddp and parts[:1] == ["module"] else parts)


def _fresh_counters(device: torch.device) -> dict[str, Tensor]:
    names = ("steps", "clipped_steps", "skipped_steps")
    return {name: torch.zeros((), dtype=torch.int64, device=device) for name in names}
