"""distclip.integrations.megatron against megatron-core 0.16's own functions and against float64.

Megatron-core installs from PyPI with torch, numpy and packaging alone (it is in the ``dev`` extra) and
imports on the CPU (without Transformer Engine or Apex it falls back to its local multi-tensor functions).
What runs on the CPU is tested against it on real gloo ranks:

- ``get_grad_norm_fp32`` for p other than 2 and inf (its ``torch.norm`` path). For p = 2 and inf it
  allocates its buffers with ``device='cuda'`` and raises on a CPU-only torch (asserted below, so the reason
  is on record); those p are checked against float64 only.
- The filter Megatron's optimizer applies before the norm (``param_is_not_shared``,
  ``param_is_not_tensor_parallel_duplicate``, on parameters marked with Megatron's own
  ``set_tensor_model_parallel_attributes``), so the layouts are Megatron's: what is counted once.
- ``clip_grad_by_total_norm_fp32`` asserts CUDA float32 gradients, and with ``use_decoupled_grad`` allocates
  on ``'cuda'`` as soon as it scales: only its no-op branch (coefficient >= 1) runs here; the scaling is
  checked against its documented semantics (``max_norm / (total_norm + 1e-6)`` if below 1, else unchanged).

Layouts, 4 ranks: pipeline 2 x tensor parallel 2 (column- and row-parallel weights as pieces, a layer norm
duplicated on the tensor-parallel ranks, a tied embedding whose copy on the last stage is ``shared``), with
the model-parallel group (the world) as the grad-stats group; and data parallel 2 x tensor parallel 2 with
4 experts on 4 expert-parallel ranks, where the dense norm is over the tensor-parallel group (the dense
gradients are replicas across data parallel) and the experts' over the world, combined as Megatron's
``ChainedOptimizer.get_grad_norm`` does, ``sqrt(dense**2 + experts**2)``.
"""

import importlib.util
import math
import warnings
import zlib

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode

from distclip.integrations import megatron as dc_megatron

from _tester import cached_mesh, cached_subgroup, reference_norm

# Megatron is imported in the gloo workers only: its import wraps some 40 functions in torch.compile and costs
# seconds, which the test process (and the tests after this module) need not share.
if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    pytest.skip("megatron-core is not installed (it is in the dev extra)", allow_module_level=True)

INF = math.inf
WORLD_SIZE = 4
TIMEOUT_S = 120
REL_TOL = 1e-5
MAX_NORM = 1.0
CPU_NORM_TYPES = (1.0, 3.0)  # where Megatron's get_grad_norm_fp32 runs on the CPU
NORM_TYPES = (2.0, INF, *CPU_NORM_TYPES)


def seeded(*key, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32("/".join(map(str, key)).encode()))
    return torch.randn(shape, generator=gen, dtype=torch.float64)


# Full tensors: (name, shape, tensor-parallel split dim or None for a duplicate).
DENSE = [("qkv", (8, 6), 0), ("proj", (6, 8), 1), ("ln", (6,), None)]
EMBEDDING = ("embedding", (10, 4), 0)
EXPERT_SHAPE = (6, 4)


def pp_tp_reference() -> list[torch.Tensor]:
    """Every element of the pipeline x tensor-parallel model once: both stages' layers, the embedding once."""
    return [seeded("pp", stage, name, shape=shape) for stage in (0, 1) for name, shape, _ in DENSE] + [
        seeded("pp", "embedding", shape=EMBEDDING[1])
    ]


def dp_tp_ep_reference() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(dense, experts) of the data x tensor-parallel model with 4 experts, each element once."""
    return [seeded("dp", name, shape=shape) for name, shape, _ in DENSE], [
        seeded("expert", e, shape=EXPERT_SHAPE) for e in range(WORLD_SIZE)
    ]


# --------------------------------------------------------------------------------------------------------
# Rank side.
# --------------------------------------------------------------------------------------------------------

def _groups():
    """(tp group, pp group) of this rank; ranks 2s, 2s+1 form stage s (or data-parallel replica s)."""
    return cached_subgroup(((0, 1), (2, 3))), cached_subgroup(((0, 2), (1, 3)))


def _param(full: torch.Tensor, split_dim, tp_rank: int) -> nn.Parameter:
    """A float32 parameter holding this tensor-parallel rank's piece of ``full`` as its gradient, marked
    with Megatron's own attributes (a piece: ``tensor_model_parallel``; else a duplicate)."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    piece = full if split_dim is None else full.chunk(2, dim=split_dim)[tp_rank]
    param = nn.Parameter(torch.zeros(piece.shape))
    param.grad = piece.float().contiguous()
    set_tensor_model_parallel_attributes(param, split_dim is not None, 0 if split_dim is None else split_dim, 1)
    return param


def _megatron_filter(params, tp_group):
    """Megatron's ``get_main_grads_for_grad_norm``: not shared, not a tensor-parallel duplicate."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    return [p.grad for p in params if p.grad is not None and param_is_not_shared(p)
            and param_is_not_tensor_parallel_duplicate(p, tp_group)]


def _pp_tp_params():
    tp_group, _ = _groups()
    stage, tp_rank = dist.get_rank() // 2, dist.get_rank() % 2
    params = [_param(seeded("pp", stage, name, shape=shape), dim, tp_rank) for name, shape, dim in DENSE]
    embedding = _param(seeded("pp", "embedding", shape=EMBEDDING[1]), EMBEDDING[2], tp_rank)
    if stage == 1:
        embedding.shared = True  # the last stage's copy of the tied embedding (its gradient summed with stage 0's)
    return params + [embedding], tp_group


def _dp_tp_ep_params():
    tp_group, _ = _groups()
    tp_rank = dist.get_rank() % 2
    dense = [_param(seeded("dp", name, shape=shape), dim, tp_rank) for name, shape, dim in DENSE]
    expert = _param(seeded("expert", dist.get_rank(), shape=EXPERT_SHAPE), None, 0)
    expert.tensor_model_parallel = True  # expert-tensor-parallel size 1: this rank's own expert
    return dense, [expert], tp_group


def _fsdp_grads():
    """Megatron-FSDP: DTensor gradients sharded over a 2-rank data-parallel mesh dimension, a different model
    on each coordinate of the 2-rank model-parallel one (the grad-stats group)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = cached_mesh((2, 2), ("mp", "dp"))
    mp = mesh.get_local_rank("mp")
    grads = [distribute_tensor(seeded("fsdp", mp, name, shape=shape).float(), mesh["dp"], [Shard(0)],
                               src_data_rank=None) for name, shape, _ in DENSE]
    return grads, mesh["mp"].get_group()


def fsdp_reference() -> list[torch.Tensor]:
    return [seeded("fsdp", mp, name, shape=shape) for mp in (0, 1) for name, shape, _ in DENSE]


def _norms(get_norm, grads, group, norm_types):
    out = {}
    for p in norm_types:
        with CommDebugMode() as mode:
            value = get_norm(grads, p, grad_stats_parallel_group=group)
        out[p] = (type(value).__name__, value, mode.get_total_counts())
    return out


def _rank_side():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.optimizer.clip_grads import (
            get_grad_norm_fp32 as megatron_norm,
        )
    apis = {"distclip": (dc_megatron.get_grad_norm_fp32, NORM_TYPES), "megatron": (megatron_norm, CPU_NORM_TYPES)}
    out = {}

    params, tp_group = _pp_tp_params()
    grads = _megatron_filter(params, tp_group)
    out["pp_tp"] = {api: _norms(fn, grads, None, p) for api, (fn, p) in apis.items()}
    total = dc_megatron.get_grad_norm_fp32(grads)
    before = [p.grad.clone() for p in params]
    dc_megatron.clip_grad_by_total_norm_fp32(params, MAX_NORM, total)
    out["pp_tp_clip"] = (total, before, [p.grad.clone() for p in params])

    grads, mp_group = _fsdp_grads()
    out["fsdp"] = {api: _norms(fn, grads, mp_group, p) for api, (fn, p) in apis.items()}

    dense, experts, tp_group = _dp_tp_ep_params()
    dense_grads, expert_grads = _megatron_filter(dense, tp_group), _megatron_filter(experts, None)
    out["dense"] = {api: _norms(fn, dense_grads, tp_group, p) for api, (fn, p) in apis.items()}
    out["experts"] = {api: _norms(fn, expert_grads, dist.group.WORLD, p) for api, (fn, p) in apis.items()}
    out["local"] = _megatron_local_checks()
    return out


# --------------------------------------------------------------------------------------------------------
# Test side.
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rank_results(worlds):
    return worlds(WORLD_SIZE).run(_rank_side, timeout=TIMEOUT_S)


def _check(results, key, reference, label):
    for p in NORM_TYPES:
        ref = reference_norm(reference, p)
        for r, res in enumerate(results):
            kind, value, comms = res[key]["distclip"][p]
            assert kind == "float", (label, p, r, kind)  # Megatron returns a Python float
            assert math.isclose(value, ref, rel_tol=REL_TOL), (label, p, r, value, ref)
            assert comms == 1, (label, p, r, comms)
            if p in CPU_NORM_TYPES:
                _, theirs, _ = res[key]["megatron"][p]
                assert math.isclose(theirs, ref, rel_tol=REL_TOL), (label, "megatron", p, r, theirs, ref)
                assert math.isclose(value, theirs, rel_tol=REL_TOL), (label, p, r, value, theirs)
        values = [res[key]["distclip"][p][1] for res in results]
        assert len(set(values)) == 1, (label, p, values)


def test_tp_duplicates_and_shared_parameters_count_once(rank_results):
    """Pipeline 2 x tensor parallel 2 with Megatron's filter: the norm of the whole model, each element once
    (the layer norm once per stage, the tied embedding once), for p = 2, inf, 1, 3; equal to Megatron's for
    p = 1, 3; a float, the same on every rank, from one collective."""
    _check(rank_results, "pp_tp", pp_tp_reference(), "pp x tp")


def test_dtensor_gradients_reduce_over_their_mesh_and_the_group(rank_results):
    """Megatron-FSDP's DTensor gradients: reduced over their data-parallel mesh and the grad-stats group, as
    Megatron does (and equal to it for p = 1, 3): the norm of every model-parallel coordinate's full tensors."""
    _check(rank_results, "fsdp", fsdp_reference(), "fsdp")


def test_expert_norm_is_summed_with_the_dense_norm(rank_results):
    """Data parallel 2 x tensor parallel 2 with 4 experts: the dense norm over the tensor-parallel group and
    the experts' over the world are each right (and Megatron's for p = 1, 3), and combined as Megatron's
    ChainedOptimizer does they give the norm of the whole model, experts summed, not averaged."""
    dense_ref, expert_ref = dp_tp_ep_reference()
    _check(rank_results, "dense", dense_ref, "dense")
    _check(rank_results, "experts", expert_ref, "experts")
    for r, res in enumerate(rank_results):
        combined = math.sqrt(res["dense"]["distclip"][2.0][1] ** 2 + res["experts"]["distclip"][2.0][1] ** 2)
        assert math.isclose(combined, reference_norm(dense_ref + expert_ref, 2), rel_tol=REL_TOL), r


def test_clip_scales_every_copy_by_the_coefficient(rank_results):
    """clip_grad_by_total_norm_fp32 on all parameters (duplicates and the shared copy included, as Megatron's
    optimizer passes them): each gradient times max_norm / (total + 1e-6)."""
    for r, res in enumerate(rank_results):
        total, before, after = res["pp_tp_clip"]
        c = MAX_NORM / (total + 1e-6)
        assert c < 1, total
        for b, a in zip(before, after):
            torch.testing.assert_close(a, b * c, rtol=2e-6, atol=0)


def _clip_params():
    out = []
    for k in range(3):
        param = nn.Parameter(torch.zeros(5))
        param.grad = seeded("clip", k, shape=(5,)).float()
        param.decoupled_grad = 2 * param.grad
        out.append(param)
    return out


def _megatron_local_checks():
    """On one process (here a worker, where Megatron is imported): Megatron's clip where it runs on the CPU
    (its no-op branch with use_decoupled_grad; its .grad path asserts CUDA tensors even to do nothing) beside
    distclip's; and what Megatron's norm raises for p = 2 and inf on a CPU-only torch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.optimizer import clip_grads
    agree = []
    for total in (0.5, 1.0 - 1e-6, float("nan")):
        ours, theirs = _clip_params(), _clip_params()
        dc_megatron.clip_grad_by_total_norm_fp32(ours, MAX_NORM, total, True)
        clip_grads.clip_grad_by_total_norm_fp32(theirs, MAX_NORM, total, True)
        agree.append(all(torch.equal(a.grad, b.grad) and torch.equal(a.decoupled_grad, b.decoupled_grad)
                         for a, b in zip(ours, theirs)))
    errors = []
    if not torch.cuda.is_available():
        for p in (2, INF):
            try:
                clip_grads.get_grad_norm_fp32([torch.ones(3)], p)
                errors.append(None)
            except (AssertionError, RuntimeError) as err:
                errors.append(str(err))
    return agree, errors


def test_clip_semantics_match_megatron(rank_results):
    """Megatron's documented semantics: no change when the coefficient is 1 or more or the norm is NaN
    (Megatron's no-op branch agrees, on the workers); ``use_decoupled_grad`` scales ``decoupled_grad`` and
    skips parameters without one, leaving ``.grad`` alone; a single tensor is one parameter."""
    agree, _ = rank_results[0]["local"]
    assert agree == [True, True, True], agree
    for total in (0.5, 1.0 - 1e-6, float("nan")):
        ps, unchanged = _clip_params(), _clip_params()
        dc_megatron.clip_grad_by_total_norm_fp32(ps, MAX_NORM, total)
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(ps, unchanged)), total

    ps = _clip_params()
    del ps[1].decoupled_grad
    grads, decoupled = [p.grad.clone() for p in ps], [getattr(p, "decoupled_grad", None) for p in ps]
    decoupled = [None if d is None else d.clone() for d in decoupled]
    dc_megatron.clip_grad_by_total_norm_fp32(ps, 0.5, 4.0, use_decoupled_grad=True)
    c = 0.5 / (4.0 + 1e-6)
    for p, g, d in zip(ps, grads, decoupled):
        assert torch.equal(p.grad, g)
        if d is not None:
            torch.testing.assert_close(p.decoupled_grad, d * c, rtol=2e-7, atol=0)

    single = nn.Parameter(torch.zeros(2, 3))
    single.grad = torch.full((2, 3), 3.0)
    dc_megatron.clip_grad_by_total_norm_fp32(single, 1.0, 3.0)
    torch.testing.assert_close(single.grad, torch.full((2, 3), 3.0 * (1.0 / (3.0 + 1e-6))))


@pytest.mark.skipif(torch.cuda.is_available(), reason="records why p = 2 and inf are not compared on the CPU")
def test_megatron_norm_needs_cuda_for_p_2_and_inf(rank_results):
    """Megatron's get_grad_norm_fp32 allocates on 'cuda' for p = 2 and inf, so it cannot run on a CPU torch."""
    _, errors = rank_results[0]["local"]
    assert len(errors) == 2 and all(e is not None and "CUDA" in e for e in errors), errors
