"""DTensor gradients: tensor parallel on a 2x2 ("dp", "tp") mesh and on its "tp" sub-mesh, DTensors on two
meshes, DTensors beside plain tensors, and sub-mesh DTensors declared replicated over dp.

Each layout's gradients are seeded full tensors (the same on every rank and in the test, their own float64
reference) distributed with ``distribute_tensor``; distclip's clip and ``get_total_norm`` (and, where torch
can, torch's clip) run on the same gradients (restored in between, ``_tester.clip_once``). Collectives per
clip, distclip / torch: 1 / 2 on the 2x2 mesh (one all_reduce per sharded mesh dim), 1 / 1 on the "tp"
sub-mesh, 1 / raises on two meshes, 1 / -- beside plain tensors (torch cannot mix them) and declared replicas.
"""

import math
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import distclip
from _tester import (
    cached_mesh,
    check_clip,
    check_matches_framework,
    check_same_on_every_rank,
    clip_once,
    clips_for,
    reference_norm,
    run_cases,
    snapshot,
)

INF = math.inf
TP_MESH_DIMS = ("dp", "tp")
R, S0, S1 = Replicate(), Shard(0), Shard(1)

# (shape, seed, mesh, placements): shapes chosen so that most shards are uneven. The meshes: "1d" over the
# world, "2d" the 2x2 ("dp", "tp") mesh, "tp" its "tp" sub-mesh.
TP_ITEMS = [
    ((5, 3), 1, "2d", (R, S0)),   # column/row-parallel weight, replicated over dp
    ((4, 5), 2, "2d", (R, S1)),
    ((3,), 3, "2d", (R, R)),      # a replicated bias / norm weight
    ((6, 5), 4, "2d", (S0, S1)),  # sharded over both mesh dims (FSDP + TP)
    ((3, 2), 5, "2d", (S0, R)),
    ((7,), 6, "2d", (S0, S0)),
]
TWO_MESH_ITEMS = [
    ((6, 5), 7, "1d", (S0,)),
    ((5,), 8, "1d", (R,)),
    ((5, 3), 9, "2d", (R, S0)),
    ((4, 6), 10, "2d", (S0, S1)),
]
PLAIN_ITEMS = [((4, 3), 11), ((2,), 12)]  # plain tensors, the same on every rank
TP_SUBMESH_ITEMS = [  # tensor parallel on the "tp" sub-mesh, data parallel (DDP-style replicas) over "dp"
    ((5, 3), 13, "tp", (S0,)),
    ((4, 5), 14, "tp", (S1,)),
    ((3,), 15, "tp", (R,)),
]
DTENSOR_NORM_TYPES = [2.0, 1.0, 3.0, INF, -INF]


class DTensorLayout(NamedTuple):
    label: str
    items: list
    kind: str  # what distclip returns: "DTensor" (every gradient a DTensor on one mesh) or "Tensor"
    torch_comms: int | None  # collectives of torch's clip; None: torch cannot clip this layout
    declare_tp_over_dp: bool = False  # the "tp" sub-mesh items declared replicated over dp, group=WORLD


def dtensor_layouts(world_size):
    """The DTensor layouts tested on a world of ``world_size`` ranks."""
    one_mesh = [item for item in TWO_MESH_ITEMS if item[2] == "1d"]
    layouts = [DTensorLayout("DTensors on a 1-D mesh + plain tensors", one_mesh + PLAIN_ITEMS, "Tensor", None)]
    if world_size == 4:
        layouts += [
            DTensorLayout("tensor parallel on a 2x2 (dp, tp) mesh", TP_ITEMS, "DTensor", 2),
            DTensorLayout("tensor parallel on the tp sub-mesh", TP_SUBMESH_ITEMS, "DTensor", 1),
            DTensorLayout("DTensors on two meshes", TWO_MESH_ITEMS, "Tensor", None),
            DTensorLayout("DTensors on two meshes + plain tensors",
                          PLAIN_ITEMS[:1] + TWO_MESH_ITEMS + PLAIN_ITEMS[1:], "Tensor", None),
            DTensorLayout("2x2-mesh DTensors + tp sub-mesh DTensors declared replicated over dp, group=WORLD",
                          TP_ITEMS[3:5] + TP_SUBMESH_ITEMS, "Tensor", None, declare_tp_over_dp=True),
        ]
    return layouts


def seeded_tensor(shape, seed):
    """The full float32 gradient of one item of a DTensor case (the same on every rank and in the test)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def items_reference(items):
    """The full tensors of ``items``, each once."""
    return [seeded_tensor(item[0], item[1]) for item in items]


# --------------------------------------------------------------------------------------------------------
# Rank side: runs inside the gloo workers.
# --------------------------------------------------------------------------------------------------------


def _item_mesh(name):
    if name == "1d":
        return cached_mesh((dist.get_world_size(),))
    mesh = cached_mesh((2, 2), TP_MESH_DIMS)
    return mesh["tp"] if name == "tp" else mesh


def _item_param(item):
    """A parameter with the gradient ``item`` describes: ``(shape, seed, mesh, placements)`` a DTensor
    parameter whose grad is the full seeded tensor distributed with those placements (no communication:
    every rank has the full tensor), or ``(shape, seed)`` a plain parameter with the full tensor as grad."""
    shape, seed, *where = item
    full = seeded_tensor(shape, seed)
    if not where:
        param = nn.Parameter(torch.zeros(shape))
        param.grad = full
        return param
    mesh_name, placements = where
    mesh = _item_mesh(mesh_name)
    param = nn.Parameter(distribute_tensor(torch.zeros(shape), mesh, placements, src_data_rank=None))
    param.grad = distribute_tensor(full, mesh, placements, src_data_rank=None)
    return param


def _declare_tp_over_dp(items, tensors):
    """``tensors`` (one per item) as a clip argument in which those on the "tp" sub-mesh are declared
    replicated over the "dp" group of the 2x2 mesh (their placements do not say it)."""
    dp_group = cached_mesh((2, 2), TP_MESH_DIMS)["dp"].get_group()
    on_tp = [item[2:3] == ("tp",) for item in items]
    return [t for t, tp in zip(tensors, on_tp) if not tp] + [
        {"params": [t for t, tp in zip(tensors, on_tp) if tp], "replicated_over": dp_group}]


def _rank_dtensor(case):
    """``case``: (layout, clips). For each (norm_type, max_norm): ``distclip.clip_grad_norm_`` of the items'
    parameters, ``distclip.get_total_norm`` of their gradients, and (where torch can) torch's clip of the same.
    With ``declare_tp_over_dp`` the "tp" sub-mesh items are declared replicated over dp, reduced over the world."""
    layout, clips = case
    params = [_item_param(item) for item in layout.items]
    grads = [p.grad for p in params]
    group, clipped, total = None, params, grads
    if layout.declare_tp_over_dp:
        group = dist.group.WORLD
        clipped, total = _declare_tp_over_dp(layout.items, params), _declare_tp_over_dp(layout.items, grads)
    saved = snapshot(params)
    entries = []
    for norm_type, max_norm in clips:
        entry = dict(
            distclip=clip_once(
                params, saved, lambda: distclip.clip_grad_norm_(clipped, max_norm, norm_type, group=group)),
            total=clip_once(params, saved, lambda: distclip.get_total_norm(total, norm_type, group=group)),
        )
        if layout.torch_comms is not None:
            entry["framework"] = clip_once(
                params, saved, lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type))
        entries.append(entry)
    return dict(before=saved, clips=entries)


def _rank_torch_clip(items):
    """Only torch's clip of the items' parameters (expected to fail on every rank alike)."""
    params = [_item_param(item) for item in items]
    try:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    except Exception as err:  # the outcome the test expects
        return type(err), str(err)
    return None


# --------------------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
def test_dtensor_gradients_give_norm_of_full_tensors(worlds, world_size):
    """DTensor gradients from ``distribute_tensor`` of seeded full tensors, with group=None: tensor-parallel
    placements on a 2x2 ("dp", "tp") mesh (Replicate/Shard mixes, Shard on both dims) and on its 1-D "tp"
    sub-mesh (replicas over "dp" not in the placements), DTensors on two meshes in one call (a 1-D mesh and a
    2-D mesh over the same ranks), and plain tensors beside them (the same on every rank: counted once); and,
    with group=WORLD, 2-D-mesh DTensors beside tp-sub-mesh ones declared ``replicated_over`` the dp group.
    ``clip_grad_norm_`` and ``get_total_norm`` give the float64 norm of the full tensors, bitwise the same on
    every rank, from 1 collective; a replicated float32 DTensor when every gradient is a DTensor on one mesh,
    else a float64 tensor. On one mesh it equals torch's clip, which makes one all_reduce per sharded mesh
    dimension (2 on the 2x2 mesh)."""
    layouts = dtensor_layouts(world_size)
    clips = [clips_for(items_reference(layout.items), DTENSOR_NORM_TYPES) for layout in layouts]
    results = run_cases(worlds(world_size), _rank_dtensor, list(zip(layouts, clips)))
    for i, (layout, ranks) in enumerate(zip(layouts, results)):
        ref_tensors = items_reference(layout.items)
        for j, (norm_type, max_norm) in enumerate(clips[i]):
            ref = reference_norm(ref_tensors, norm_type)
            what = f"{layout.label} p={norm_type}"
            for r, res in enumerate(ranks):
                entry = res["clips"][j]
                for api, cap in (("distclip", max_norm), ("total", INF)):
                    check_clip(entry[api], res["before"], ref, cap, 1, f"{what} rank {r} {api}", kind=layout.kind)
                    norm = entry[api]["norm"]
                    if layout.kind == "DTensor":
                        assert all(p.is_replicate() for p in norm["placements"]), f"{what} rank {r}: {norm}"
                        assert norm["dtype"] == torch.float32, f"{what} rank {r}: {norm}"
                    else:
                        assert norm["dtype"] == torch.float64, f"{what} rank {r}: {norm}"
                if layout.torch_comms is not None:
                    check_clip(entry["framework"], res["before"], ref, max_norm, layout.torch_comms,
                               f"{what} rank {r} torch", kind="DTensor")
                    check_matches_framework(entry["distclip"], entry["framework"], f"{what} rank {r}")
            for api in ("distclip", "total"):
                check_same_on_every_rank([res["clips"][j][api] for res in ranks], f"{what} {api}")


def test_torch_clip_fails_on_two_meshes(worlds):
    """What distclip adds in the test above: torch's clip of DTensors on two meshes raises (on every rank
    alike, before any collective), in its own world call."""
    outcomes = worlds(4).run(_rank_torch_clip, TWO_MESH_ITEMS)
    for r, outcome in enumerate(outcomes):
        assert outcome is not None, f"rank {r}: torch's clip returned"
        assert outcome[0] is RuntimeError and "same mesh" in outcome[1], f"rank {r}: {outcome}"
