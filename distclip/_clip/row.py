"""The reduction row: the float64 vector each rank contributes to a sharded clip's one collective.

Its schema lives here alone. A clip's row is ``(local_norm, has_elements, norm_type, max_norm,
error_if_nonfinite)``: the rank's local norm, whether it counted any element, and the call's arguments, which
every rank must pass the same (``max_norm`` is -1 for ``get_total_norm``). Per-unit norms send one
``(local_norm, has_elements)`` pair per unit and no arguments.
"""

import torch
from torch import Tensor

NORM_COLUMNS = ("local_norm", "has_elements")
ARGUMENT_COLUMNS = ("norm_type", "max_norm", "error_if_nonfinite")
_LOCAL_NORM, _HAS_ELEMENTS = 0, 1


def clip_arguments(p: float, max_norm: float | None, error_if_nonfinite: bool) -> tuple[float, float, float]:
    """The argument columns of a clip's row (``max_norm=None``: ``get_total_norm``, which does not clip)."""
    return (p, -1.0 if max_norm is None else max_norm, float(bool(error_if_nonfinite)))


def encode(local_norm: Tensor | None, arguments: tuple[float, ...], device: torch.device) -> Tensor:
    """A row on ``device``: ``local_norm`` (a float64 0-d tensor; ``None`` for a rank with no element) and
    ``arguments`` (`clip_arguments`, or ``()`` for a unit's row)."""
    row = torch.tensor([0.0, float(local_norm is not None), *arguments], dtype=torch.float64, device=device)
    if local_norm is not None:
        row[_LOCAL_NORM] = local_norm
    return row


def norms(rows: Tensor) -> tuple[Tensor, Tensor]:
    """``(local norms, holds elements)`` of gathered ``rows`` (one row per rank), as float64 and bool vectors."""
    return rows[:, _LOCAL_NORM], rows[:, _HAS_ELEMENTS] > 0


def check_agreement(rows: Tensor) -> None:
    """Raise ``ValueError`` on every rank if the ranks passed different arguments (or made different calls).

    Every rank reads the same rows, so every rank raises the same error, before any gradient changes. This
    reads ``rows`` on the host (a device-to-host copy on accelerators).
    """
    arguments = rows[:, len(NORM_COLUMNS):].tolist()
    if all(a == arguments[0] for a in arguments):
        return
    differences = []
    for column, name in enumerate(ARGUMENT_COLUMNS):
        by_value: dict[float, list[int]] = {}
        for rank, a in enumerate(arguments):
            by_value.setdefault(a[column], []).append(rank)
        if len(by_value) > 1:
            differences.append(
                f"{name} is " + "; ".join(f"{_shown(name, v)} on ranks {ranks}" for v, ranks in by_value.items())
            )
    raise ValueError(
        f"distclip: the ranks of the group made different calls ({', '.join(differences)}; ranks are "
        "group ranks). Every rank of a group must make the same call with the same arguments; nothing was clipped"
    )


def _shown(name: str, value: float) -> str:
    if name == "max_norm" and value < 0:
        return "none (get_total_norm)"
    if name == "error_if_nonfinite":
        return str(bool(value))
    return repr(value)
