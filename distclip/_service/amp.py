"""AMP: what `GradClipper` reads and sets of a ``torch.amp.GradScaler``'s per-optimizer state.

The state (``_per_optimizer_states``: each optimizer's stage and per-device overflow flags) is private to torch
(tested with torch 2.13); it is read in this module alone, and a torch that keeps it differently gets a clear
error instead of a wrong unscale.
"""

from typing import Any

import torch
from torch import Tensor


def unscale_(scaler: torch.amp.GradScaler, optimizer: Any) -> None:
    """Unscale ``optimizer``'s gradients with ``scaler`` unless they are already (without ``optimizer``: check
    that some optimizer's are); no synchronisation."""
    states, stages = _states(scaler)
    if optimizer is None:
        if not any(state["stage"] is stages.UNSCALED for state in states.values()):
            raise RuntimeError(
                "distclip: the gradients are still scaled by the GradScaler (no scaler.unscale_(optimizer) "
                "since the last update()), so their norm would be the scaled one: pass optimizer= to the "
                "GradClipper to unscale them, or call scaler.unscale_(optimizer) before clip_()"
            )
        return
    stage = states[id(optimizer)]["stage"] if id(optimizer) in states else stages.READY
    if stage is stages.READY:
        scaler.unscale_(optimizer)
    elif stage is stages.STEPPED:
        raise RuntimeError(
            "distclip: clip_() after scaler.step(optimizer) and before scaler.update(): clip before the step"
        )


def overflow(scaler: torch.amp.GradScaler, optimizer: Any, device: torch.device) -> Tensor:
    """1.0 if unscaling ``optimizer``'s gradients found an inf or NaN on any device, else 0.0 (float32, on
    ``device``), without reading it on the host."""
    states, _ = _states(scaler)
    found = states[id(optimizer)]["found_inf_per_device"].values()
    total = sum((t.to(device) for t in found), torch.zeros((), dtype=torch.float32, device=device))
    return torch.clamp(total, max=1.0)


def mark_stepped(scaler: torch.amp.GradScaler, optimizer: Any) -> None:
    """Leave ``scaler``'s state for ``optimizer`` as ``scaler.step(optimizer)`` does: ``scaler.update()`` is next."""
    states, stages = _states(scaler)
    states[id(optimizer)]["stage"] = stages.STEPPED


def _states(scaler: torch.amp.GradScaler) -> tuple[dict[int, dict[str, Any]], Any]:
    try:
        from torch.amp.grad_scaler import OptState

        states = scaler._per_optimizer_states
    except (ImportError, AttributeError) as err:
        raise RuntimeError(
            f"distclip: this torch ({torch.__version__}) keeps a GradScaler's per-optimizer state differently from "
            "the versions distclip was tested with (2.13); unscale with scaler.unscale_(optimizer) yourself and give "
            "the GradClipper no scaler"
        ) from err
    return states, OptState
