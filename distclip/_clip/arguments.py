"""Argument checks: every entry point's arguments are converted and checked here, when the call is made (at
construction for `GradClipper`, the policies and the integrations), with errors that name the argument, its
value and what to pass instead."""

import math
import os
from typing import Any

from distclip._clip import reduction


def as_float(value: Any, name: str) -> float:
    """``float(value)``, as ``torch.nn.utils`` converts it, with a clearer error of the same type."""
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise type(err)(
            f"`{name}` must be a real number (a float, an int, or a string such as 'inf'), "
            f"got {value!r} of type {type(value).__name__}"
        ) from err


def max_norm_value(max_norm: Any, sharded: bool) -> float:
    """``max_norm`` as a float. Single-process mode accepts what torch accepts (parity); sharded mode also
    rejects NaN and negative values, which would silently turn every gradient into NaN or flip its sign.
    """
    value = as_float(max_norm, "max_norm")
    if sharded and not value >= 0:
        raise ValueError(f"distclip: max_norm must be a non-negative number (inf disables clipping), got {max_norm!r}")
    return value


def norm_order(norm_type: float | str, sharded: bool, *, zero_padded: bool = False) -> float:
    """``norm_type`` as a float p; in sharded mode, only the p that have a sharded meaning; with
    ``zero_padded`` (pieces padded with zeros, as ZeRO's partitions are) not -inf either."""
    p = as_float(norm_type, "norm_type")
    if zero_padded and not p > 0:
        raise ValueError(
            f"distclip: norm_type={norm_type!r} is not supported here: use any p > 0 or inf (-inf and p <= 0 "
            "would count the zero padding of the partitions as gradient entries)"
        )
    if sharded and not p > 0 and p != -math.inf:
        raise ValueError(
            f"distclip: norm_type={norm_type!r} has no sharded meaning: with group= the norm is "
            "(sum over ranks of local_norm**p)**(1/p), defined for p > 0, inf and -inf. Use one of those, or "
            "clip on a single process (no group=) for torch's own semantics"
        )
    return p


class _NoGroup:
    """The default of ``group=``: this process's gradients alone. It is not ``None`` so that an explicit
    ``group=None`` can be told apart: ``torch.distributed.group.WORLD`` is ``None`` until
    ``init_process_group()``."""

    def __repr__(self) -> str:
        return "NO_GROUP"


NO_GROUP: Any = _NoGroup()


def process_group(group: Any) -> Any:
    """``group=`` as the layout takes it: ``None`` for this process alone, else the group.

    An explicit ``None`` is what ``torch.distributed.group.WORLD`` reads before ``init_process_group()``: in a
    process launched as one of several ranks (``WORLD_SIZE`` > 1, as torchrun, Slurm scripts and the DeepSpeed
    launcher set it) with torch.distributed not initialized, it would clip this rank's shard by its own norm
    alone, so it raises. A single process (no ``WORLD_SIZE`` > 1) holds the whole vector: ``None`` is local.
    """
    if group is NO_GROUP:
        return None
    if group is None and not reduction.initialized():
        world_size = os.environ.get("WORLD_SIZE", "1")
        if world_size.isdigit() and int(world_size) > 1:
            raise RuntimeError(
                f"distclip: group=None in a process launched as one of WORLD_SIZE={world_size} ranks, before "
                "torch.distributed.init_process_group(): torch.distributed.group.WORLD is None until then, so this "
                "would clip this rank's gradients by their local norm alone. Call init_process_group() first; to "
                "clip this process's gradients alone on purpose, leave group= out"
            )
    return group


def choice(owner: str, name: str, value: Any, choices: tuple) -> Any:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming ``owner``'s argument ``name``."""
    if value not in choices:
        raise ValueError(f"distclip: {owner} {name} must be one of {choices}, got {value!r}")
    return value


def require(ok: bool, owner: str, name: str, value: Any, rule: str) -> None:
    """Raise ``ValueError`` naming ``owner``'s argument ``name`` and its value unless ``ok``; ``rule`` says what
    the argument must be."""
    if not ok:
        raise ValueError(f"distclip: {owner} {name} must be {rule}, got {name}={value!r}")


def of_type(value: Any, owner: str, name: str, expected: str, *types: type, optional: bool = True) -> Any:
    """``value`` if it is an instance of ``types`` (or ``None`` where ``optional``), else a ``TypeError`` that
    names the argument, the value's type and what to pass (``expected``)."""
    if (value is None and optional) or isinstance(value, types):
        return value
    raise TypeError(f"distclip: {owner} {name} must be {expected}, got {value!r} of type {type(value).__name__}")
