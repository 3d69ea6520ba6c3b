"""Layout: which gradient tensors this rank holds, and the group over which they are pieces of one vector.

``group=None`` means this process holds the whole logical gradient vector. With a process group, every rank
of the group holds a disjoint piece (an FSDP/ZeRO shard, a pipeline stage, a tensor-parallel shard) and the
norm is of the concatenation of all pieces.
"""

import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from distclip import _reduction


@dataclass(frozen=True)
class Layout:
    """The group that the local gradients are shards over (``None``: not sharded), and this rank in it."""

    group: Any = None
    rank: int = 0
    world_size: int = 1

    @property
    def sharded(self) -> bool:
        return self.group is not None


def resolve(group: Any) -> Layout:
    """The layout for ``group``; raises if this process cannot take part in a collective over it."""
    if group is None:
        return Layout()
    rank, world_size = _reduction.membership(group)
    return Layout(group, rank, world_size)


class NotATensorError(TypeError, AttributeError):
    """An element of ``parameters`` has no ``.grad``.

    It is a ``TypeError`` (the argument has the wrong type) and an ``AttributeError`` (what
    ``torch.nn.utils`` raises for the same input), so handlers written for either keep working.
    """


def as_list(tensors: Tensor | Iterable[Tensor], name: str) -> list:
    """``[tensors]`` for a single tensor, else the iterable's elements (a generator is consumed once)."""
    if isinstance(tensors, Tensor):
        return [tensors]
    try:
        iterator = iter(tensors)
    except TypeError:
        raise TypeError(
            f"`{name}` must be a Tensor or an iterable of Tensors (e.g. model.parameters()), "
            f"got {type(tensors).__name__}"
        ) from None
    return list(iterator)


def parameter_list(parameters: Tensor | Iterable[Tensor], stacklevel: int) -> list:
    """``as_list(parameters)``, warning as torch does when ``parameters`` is an empty generator.

    ``stacklevel`` counts from this function's frame to the user's call, so the warning points there.
    """
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = as_list(parameters, "parameters")
    if is_generator and len(parameters) == 0:
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.",
            stacklevel=stacklevel,
        )
    return parameters


def grads_of(parameters: list) -> list[Tensor]:
    """The ``.grad`` of every parameter that has one, in order."""
    try:
        return [p.grad for p in parameters if p.grad is not None]
    except AttributeError:
        for i, p in enumerate(parameters):
            if not hasattr(p, "grad"):
                raise NotATensorError(
                    f"`parameters[{i}]` is of type {type(p).__name__}, not a tensor: pass the parameters whose "
                    "gradients to clip, e.g. model.parameters() or a list of tensors"
                ) from None
        raise

