"""Invalid layouts raise ``ValueError`` on every rank, naming the problem, before any collective (so no rank is
left waiting in one), with the gradients unchanged: a DTensor gradient with a ``Partial`` placement, declared
replicas with ``group=None``, and DTensor gradients given to ``fast_clip_grad_norm_``.
"""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

import distclip
from _tester import attempt, cached_mesh

INF = math.inf


def _rank_invalid_layouts():
    """Calls that must raise ValueError on every rank before any collective: a DTensor gradient with a
    Partial placement (clip, total norm, module clip), and declared replicas without group=."""
    mesh, rank = cached_mesh((dist.get_world_size(),)), dist.get_rank()
    partial = nn.Parameter(DTensor.from_local(torch.zeros(3), mesh, [Replicate()]))
    partial.grad = DTensor.from_local(torch.full((3,), rank + 1.0), mesh, [Partial()])
    sharded = nn.Parameter(DTensor.from_local(torch.zeros(2), mesh, [Shard(0)]))
    sharded.grad = DTensor.from_local(torch.full((2,), rank + 1.0), mesh, [Shard(0)])
    plain = nn.Parameter(torch.zeros(4))
    plain.grad = torch.ones(4)
    declared = [{"params": [plain], "replicated_over": mesh.get_group()}]
    params = [partial, sharded, plain]
    return dict(
        partial_clip=attempt(lambda: distclip.clip_grad_norm_([sharded, partial], 1.0), params),
        partial_total=attempt(lambda: distclip.get_total_norm([sharded.grad, partial.grad], INF), params),
        partial_module=attempt(
            lambda: distclip.clip_module_grad_norm_(_ModuleOf([sharded, partial]), 1.0), params),
        declared_clip=attempt(lambda: distclip.clip_grad_norm_(declared, 1.0), params),
        declared_total=attempt(
            lambda: distclip.get_total_norm([{"params": [plain.grad], "replicated_over": mesh.get_group()}]),
            params),
        fast_dtensor=attempt(lambda: distclip.fast_clip_grad_norm_([plain, sharded], 1.0), params),
    )


class _ModuleOf(nn.Module):
    """A plain module holding the given parameters (for ``clip_module_grad_norm_``)."""

    def __init__(self, params):
        super().__init__()
        self.held = nn.ParameterList(params)


@pytest.mark.parametrize("world_size", [2, 4])
def test_invalid_layouts_raise_value_error_on_every_rank(worlds, world_size):
    """A DTensor gradient with a Partial placement (``clip_grad_norm_``, ``get_total_norm``,
    ``clip_module_grad_norm_``) and declared replicas with group=None (``clip_grad_norm_``,
    ``get_total_norm``), and DTensor gradients given to ``fast_clip_grad_norm_`` (one process's plain
    gradients only): ValueError on every rank, naming the problem, before any collective (so no rank is
    left waiting in one), gradients unchanged."""
    expected = {"partial_clip": "Partial", "partial_total": "Partial", "partial_module": "Partial",
                "declared_clip": "group=", "declared_total": "group=",
                "fast_dtensor": "use distclip.clip_grad_norm_"}
    results = worlds(world_size).run(_rank_invalid_layouts)
    for r, res in enumerate(results):
        assert set(res) == set(expected)
        for call, words in expected.items():
            error, message, comms, unchanged = res[call]
            assert error is ValueError and words in message, f"{call} rank {r}: {error}: {message}"
            assert comms == 0, f"{call} rank {r}: {comms} collectives before raising"
            assert unchanged, f"{call} rank {r}: gradients changed"
