"""Layout: which gradient pieces this rank holds, which of them it counts, and the group they are reduced over.

Every call is translated here into one `Layout`:

- plain tensors and ``group=None``: this process holds the whole vector (torch's single-process clip);
- plain tensors and ``group=<ProcessGroup>``: each rank's tensors are its own disjoint pieces of one vector;
- a piece held identically by several ranks is counted only on its owner, so that one ``all_reduce`` over
  the whole group counts every element once. Such replicas are declared as a parameter group
  ``{"params": [...], "replicated_over": group_or_groups}`` (owner: rank 0 of each of those groups), or are
  the ``Replicate`` mesh dimensions of a DTensor (owner: coordinate 0 on each of them).

DTensors are recognised whatever ``group`` is. With ``group=None`` they are reduced over the ranks of their
mesh (all their meshes must span the same ranks), and plain tensors beside them are taken as replicated over
those ranks: the non-sharded parameters of an FSDP2 model.
"""

import sys
import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import torch
from torch import Tensor

from distclip._clip import reduction
from distclip._clip.foreach import Grouped, Sizes, by_device_and_dtype, sizes_of

_PLAIN_TYPES = {Tensor, torch.nn.Parameter}
_DECLARATION_KEYS = {"params", "replicated_over"}


@dataclass(frozen=True)
class Layout:
    """The local view of one logical gradient vector.

    ``grads``: every local tensor of the call (a DTensor as its local shard); all are scaled.
    ``counted``: those whose elements this rank contributes to the norm (a replica only on its owner).
    ``group``: the group the contributions are reduced over; ``None``: no collective, this process holds the
    whole vector. ``mesh``/``dtype``: for a call whose tensors are all DTensors on one mesh, the norm is
    returned as a replicated DTensor of torch's dtype on that mesh. ``flat``: in sharded mode, one tensor
    viewing exactly the elements of ``grads`` (all counted) when they are the consecutive views of one buffer.
    """

    grads: list[Tensor]
    counted: list[Tensor]
    group: Any = None
    world_size: int = 1
    mesh: Any = None
    dtype: torch.dtype | None = None
    flat: Tensor | None = None
    # The groupings and their tensors' sizes, made on first use (dicts, not functools.cached_property, whose lock
    # torch.compile cannot trace on Python 3.11).
    _groups: dict[str, Grouped] = field(default_factory=dict, init=False, repr=False, compare=False)
    _sizes: dict[str, Sizes] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def sharded(self) -> bool:
        return self.group is not None

    @property
    def norm_pieces(self) -> list[Tensor]:
        """What the local norm reads: ``counted``, or the one ``flat`` view of them."""
        return self.counted if self.flat is None else [self.flat]

    @property
    def scaled(self) -> list[Tensor]:
        """What the scaling writes: ``grads``, or the one ``flat`` view of them."""
        return self.grads if self.flat is None else [self.flat]

    @property
    def norm_groups(self) -> Grouped:
        """`norm_pieces` by device and dtype, grouped on first use."""
        return self._grouped("norm", self.norm_pieces)

    @property
    def scaled_groups(self) -> Grouped:
        """`scaled` by device and dtype: the norm's groups when the norm reads every tensor the scaling writes
        (no replica left out), so a clip groups its tensors once. Grouping costs ~0.1 us a tensor, and up to
        ~0.4 us once glibc's heap is fragmented (docs/benchmarks.md)."""
        if self.flat is not None or self.counted is self.grads:
            return self.norm_groups
        return self._grouped("scaled", self.grads)

    @property
    def norm_sizes(self) -> Sizes:
        """The element counts of `norm_groups`' tensors, read once for the norm and the scaling (read again after
        the norm has streamed every gradient through the cache, ~0.15 us a tensor)."""
        return self._sized("norm", self.norm_groups)

    @property
    def scaled_sizes(self) -> Sizes:
        """The element counts of `scaled_groups`' tensors."""
        if self.scaled_groups is self.norm_groups:
            return self.norm_sizes
        return self._sized("scaled", self.scaled_groups)

    def _grouped(self, key: str, tensors: list[Tensor]) -> Grouped:
        if key not in self._groups:
            self._groups[key] = by_device_and_dtype(tensors) if tensors else {}
        return self._groups[key]

    def _sized(self, key: str, grouped: Grouped) -> Sizes:
        if key not in self._sizes:
            self._sizes[key] = sizes_of(grouped)
        return self._sizes[key]


class NotATensorError(TypeError, AttributeError):
    """An element of ``parameters`` has no ``.grad``.

    It is a ``TypeError`` (the argument has the wrong type) and an ``AttributeError`` (what
    ``torch.nn.utils`` raises for the same input), so handlers written for either keep working.
    """


def as_list(tensors: Tensor | Iterable[Any], name: str) -> list:
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


def parameter_list(parameters: Tensor | Iterable[Any], stacklevel: int) -> list:
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


def of_parameters(parameters: list, group: Any) -> Layout:
    """The layout of the gradients of ``parameters`` (tensors, or declared parameter groups)."""
    try:
        grads = [g for g in [p.grad for p in parameters] if g is not None]
    except AttributeError:  # declared parameter groups (dicts), or something that is not a parameter
        return _layout(_entries(parameters, grads_of), group)
    return _plain_layout(grads, group)


def of_tensors(tensors: list, group: Any) -> Layout:
    """The layout of ``tensors`` themselves (for ``get_total_norm``)."""
    if any(type(t) is dict for t in tensors):
        return _layout(_entries(tensors, list), group)
    return _plain_layout(tensors, group)


def local_grads(parameters: list) -> list[Tensor]:
    """Every local gradient tensor of ``parameters``, DTensors as their local shards: what scaling changes."""
    try:
        grads = [g for g in [p.grad for p in parameters] if g is not None]
    except AttributeError:  # declared parameter groups: scaling needs their tensors, not their groups
        grads = [t for t, _ in _entries(parameters, grads_of)]
    return grads if _dtensor_type(grads) is None else [local_tensor(g) for g in grads]


def grads_of(parameters: list) -> list[Tensor]:
    """The ``.grad`` of every parameter that has one, in order."""
    try:
        return [g for g in [p.grad for p in parameters] if g is not None]
    except AttributeError:
        for i, p in enumerate(parameters):
            if not hasattr(p, "grad"):
                raise _not_a_tensor(i, p) from None
        raise


def _not_a_tensor(index: int, item: Any) -> NotATensorError:
    return NotATensorError(
        f"`parameters[{index}]` is of type {type(item).__name__}, not a tensor: pass the parameters whose "
        "gradients to clip, e.g. model.parameters() or a list of tensors, or parameter groups "
        '{"params": [...], "replicated_over": group}'
    )


def _entries(items: list, values) -> list[tuple[Tensor, tuple]]:
    """``(tensor, replica groups)`` pairs in order: for a plain item its tensor (``values([item])``: its
    ``.grad``, or itself), with no replica groups; for a declared parameter group (a dict) the tensors of its
    ``params`` with its ``replicated_over`` groups."""
    entries = []
    for i, item in enumerate(items):
        if type(item) is not dict:
            if values is grads_of and not hasattr(item, "grad"):
                raise _not_a_tensor(i, item)
            entries.extend((t, ()) for t in values([item]))
            continue
        unknown = set(item) - _DECLARATION_KEYS
        if unknown or "params" not in item:
            raise ValueError(
                f"distclip: a parameter group is {{'params': [...], 'replicated_over': group}}; got keys "
                f"{sorted(item)}"
            )
        groups = item.get("replicated_over", ())
        groups = tuple(groups) if isinstance(groups, (list, tuple)) else (groups,)
        entries.extend((t, groups) for t in values(as_list(item["params"], "params")))
    return entries


def _plain_layout(tensors: list[Tensor], group: Any) -> Layout:
    """Tensors with no declarations: this rank's own pieces over ``group`` (the whole vector without one),
    unless some are DTensors. No per-tensor work beyond what torch does."""
    if _dtensor_type(tensors) is not None:
        return _mixed_layout(tensors, None, group)
    if group is None:
        return Layout(tensors, tensors)
    _, world_size = reduction.membership(group)
    return Layout(tensors, tensors, group, world_size, flat=_one_view(tensors))


def _one_view(tensors: list[Tensor]) -> Tensor | None:
    """A 1-D tensor viewing exactly the elements of ``tensors``, if they are contiguous and each starts where
    the one before ends, in one storage: the views of a flat buffer (ZeRO partitions, FSDP1 flat shards, DDP
    buckets, the pieces of a flattened model). One kernel then reads them all for the norm and one scales them,
    instead of one per tensor; their values are the same elements, so the norm is the same up to rounding."""
    if len(tensors) < 2:
        return None
    first = tensors[0]
    dtype = first.dtype
    try:
        start = end = first.data_ptr()
        for t in tensors:
            if t.data_ptr() != end or t.dtype is not dtype or not t.is_contiguous():
                return None
            end += t.nbytes
    except RuntimeError:  # a tensor without a data pointer (sparse, meta-like): not one buffer
        return None
    storage = first.untyped_storage()
    # Neighbouring addresses alone could be two allocations side by side: the range must lie in first's storage.
    if start == end or not storage.data_ptr() <= start < end <= storage.data_ptr() + storage.nbytes():
        return None
    return first.new_empty(0).set_(storage, first.storage_offset(), ((end - start) // first.element_size(),))


def _layout(entries: list[tuple[Tensor, tuple]], group: Any) -> Layout:
    tensors = [t for t, _ in entries]
    replica_groups = [groups for _, groups in entries]
    if not any(replica_groups):
        return _plain_layout(tensors, group)
    return _mixed_layout(tensors, replica_groups, group)


def _mixed_layout(tensors: list[Tensor], replica_groups: list[tuple] | None, group: Any) -> Layout:
    """The layout of DTensors, plain tensors beside them, and declared replicas (``replica_groups``: each
    tensor's, ``None`` where nothing is declared)."""
    dtensor_type = _dtensor_type(tensors)
    plain_is_replica = group is None  # beside DTensors and without group=: replicated over the mesh's ranks
    # One pass over the DTensors: their local shards, and whether this rank counts them, decided once per
    # (mesh, placements) (None for a plain tensor). FSDP2's come in long runs on one mesh with the same
    # placement objects, which are compared by identity before their (Python) hash is taken.
    grads, owns_shard = [], []
    owns_shard_of: dict[tuple, bool] = {}
    meshes: dict[int, Any] = {}
    dtypes: set[torch.dtype] = set()
    last_mesh = last_placements = owns = None
    for t in tensors:
        if dtensor_type is None or not isinstance(t, dtensor_type):
            grads.append(t)
            owns_shard.append(None)
            continue
        # DTensor's own fields: its device_mesh and placements properties and to_local() are Python calls of
        # ~0.1-0.2 us each, and under no_grad (the clip's) to_local() returns _local_tensor itself.
        spec = t._spec
        mesh, placements = spec.mesh, spec.placements
        if mesh is not last_mesh or placements != last_placements:
            key = (id(mesh), placements)
            owns = owns_shard_of.get(key)
            if owns is None:
                meshes[id(mesh)] = mesh
                owns = owns_shard_of[key] = _owns_dtensor(t)
            last_mesh, last_placements = mesh, placements
        local = t._local_tensor
        grads.append(local)
        owns_shard.append(owns)
        dtypes.add(local.dtype)
    if group is None:
        if not meshes:
            raise ValueError(
                'distclip: parameters declared with "replicated_over" need group=: the group over which the '
                "counted pieces make up the whole gradient"
            )
        group = _mesh_group(list(meshes.values()))
    rank, world_size = reduction.membership(group)
    counted = _counted(grads, owns_shard, replica_groups, rank == 0 or not plain_is_replica)
    all_dtensors = None not in owns_shard
    declared = replica_groups is not None
    mesh, dtype = _dtensor_result(list(meshes.values()), dtypes) if all_dtensors and not declared else (None, None)
    return Layout(grads, counted, group, world_size, mesh, dtype)


def _counted(grads: list[Tensor], owns_shard: list[bool | None], replica_groups: list[tuple] | None,
             owns_plain: bool) -> list[Tensor]:
    """The tensors of ``grads`` this rank counts: a DTensor's shard where it owns it (``owns_shard``), a
    declared replica where it is rank 0 of all its ``replica_groups``, an undeclared plain tensor where
    ``owns_plain``."""
    if replica_groups is None:
        if False not in owns_shard and (owns_plain or None not in owns_shard):
            return grads
        return [g for g, owns in zip(grads, owns_shard) if owns or (owns is None and owns_plain)]
    owner_of: dict[tuple[int, ...], bool] = {}  # per tuple of replica groups: is this rank rank 0 in all?
    counted = []
    for local, owns, groups in zip(grads, owns_shard, replica_groups):
        if owns is False:
            continue
        if owns is None and not groups:
            owner = owns_plain
        else:
            key = tuple(map(id, groups))
            if key not in owner_of:
                owner_of[key] = all(reduction.membership(g)[0] == 0 for g in groups)
            owner = owner_of[key]
        if owner:
            counted.append(local)
    return counted


def dtensor_class() -> type | None:
    """``DTensor``, if its module was imported. It costs half a second to import, and if no one imported it, no
    tensor is a DTensor: the one probe for DTensors of the clip and the service."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _dtensor_type(tensors: list[Tensor]) -> type | None:
    """`dtensor_class` if some of ``tensors`` may be DTensors (a type other than a plain tensor's)."""
    if set(map(type, tensors)) <= _PLAIN_TYPES:
        return None
    return dtensor_class()


def _owns_dtensor(t: Tensor) -> bool:
    """Whether this rank counts its shard of DTensor ``t``: coordinate 0 on every ``Replicate`` mesh dimension."""
    for placement in t.placements:
        if placement.is_partial():
            raise ValueError(
                f"distclip: a DTensor gradient has the Partial placement {placement}: its local tensor is a "
                "partial sum, whose norm is not a piece of the norm; redistribute it to Shard or Replicate first"
            )
    coordinate = t.device_mesh.get_coordinate()
    return all(coordinate[d] == 0 for d, p in enumerate(t.placements) if p.is_replicate())


def _mesh_group(meshes: list[Any]) -> Any:
    """The group spanning the ranks of the DTensors' ``meshes``, which must all span the same ranks."""
    world, world_size = reduction.world()
    if all(m.size() == world_size for m in meshes):
        # A mesh's ranks are distinct global ranks, so one of the world's size spans the world. Its ranks as a
        # list (DeviceMesh.mesh) cost ~25 us a mesh, a fixed cost of every FSDP2 clip.
        return world
    rank_sets = {tuple(sorted(m.mesh.flatten().tolist())) for m in meshes}
    if len(rank_sets) > 1:
        raise ValueError(
            "distclip: the DTensor gradients live on meshes over different ranks "
            f"({', '.join(str(list(r)) for r in sorted(rank_sets))}); pass group= covering all of them, and "
            "declare the DTensors of the smaller meshes that are copies across the other ranks as "
            '{"params": [...], "replicated_over": group} (their placements cannot say so), or they count twice'
        )
    (ranks,) = rank_sets
    mesh = meshes[0]
    if mesh.ndim == 1:
        return mesh.get_group()
    raise ValueError(
        f"distclip: the DTensor gradients' mesh spans ranks {list(ranks)}, not the whole world: pass group= "
        "with a process group over exactly those ranks"
    )


def _dtensor_result(meshes: list[Any], dtypes: set[torch.dtype]) -> tuple[Any, torch.dtype | None]:
    """The mesh and dtype torch would return the norm with, for DTensors (every tensor of the call) of
    ``dtypes`` on ``meshes``: when they are all on one mesh."""
    mesh = meshes[0]
    if any(m != mesh for m in meshes[1:]):
        return None, None
    return mesh, reduce(torch.promote_types, dtypes)


def local_tensor(t: Tensor) -> Tensor:
    """A DTensor's local tensor (the shard this rank holds); any other tensor itself."""
    dtensor = dtensor_class()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t
