"""distclip.integrations.torchtitan against torchtitan's own clip and against float64.

On 4 real gloo ranks, each case builds torchtitan's layouts from seeded full tensors: DTensor parameters on a
2x2 FSDP+TP mesh, pipeline stages (a 2x2 ("pp", "dp_shard") mesh with DTensors, and plain tensors replicated
inside each stage as under DDP), and experts on an ("efsdp", "ep") mesh beside dense parameters on an
("fsdp",) mesh, with and without pipeline stages (a 3-D ("pp", "efsdp", "ep") mesh). On the same gradients
(restored in between) it runs ``torchtitan.distributed.utils.clip_grad_norm_`` and distclip's drop-in, and
checks: the norm (rel 1e-5 against the float64 norm of the full tensors, and against torchtitan's), its type
and dtype (a plain tensor of the gradients' dtype, as torchtitan's), that every rank has the same norm,
the clipped gradients (the ones before times the float64 coefficient, and torchtitan's), and that distclip
made one collective (torchtitan makes one per sharded mesh dimension plus the pipeline's).

torchtitan 0.3.0 is not in the ``dev`` extra: its requirements (``datasets<4.8``, ``wandb``, ``tensorboard``,
``torchdata``, ...) pull in some 30 packages and move ``huggingface_hub`` from 2.x back to 1.x under the
transformers the rest of the suite tests. Its clip needs only ``pip install --no-deps torchtitan==0.3.0
spmd_types==0.2.3 tyro docstring_parser typeguard``; where that is installed the comparison with torchtitan
runs, and everywhere the checks against float64 (torchtitan's documented semantics) run.
"""

import math
import zlib

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from distclip.integrations import torchtitan as dc_torchtitan

from _tester import cached_mesh, clip_coefficient, local, reference_norm

try:
    from torchtitan.distributed.utils import clip_grad_norm_ as torchtitan_clip
except ImportError:  # see the module docstring
    torchtitan_clip = None

INF = math.inf
REL_TOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 2e-5, 1e-7
MAX_NORM = 1.0
NORM_TYPES = (2.0, 3.0, INF)
WORLD_SIZE = 4
TIMEOUT_S = 120

needs_torchtitan = pytest.mark.skipif(
    torchtitan_clip is None, reason="torchtitan is not installed (not in the dev extra: see the module docstring)"
)

# A case: (label, {mesh key: (shape, dim names)}, pp mesh (key, dim) or None, ep_enabled, tensors).
# A tensor: (name, shape, dtype, mesh key, mesh dims or None for the whole mesh, placements, per_stage).
# Placements None: a plain tensor, the same on every rank of a stage. per_stage: different values per stage.
F32, BF16 = torch.float32, torch.bfloat16
CASES = [
    ("fsdp+tp 2x2", {"m": ((2, 2), ("dp_shard", "tp"))}, None, False, [
        ("colwise", (8, 6), F32, "m", None, (Shard(0), Shard(1)), False),
        ("rowwise", (6, 8), F32, "m", None, (Shard(1), Shard(0)), False),
        ("norm", (8,), F32, "m", None, (Shard(0), Replicate()), False),
        ("bias", (6,), BF16, "m", None, (Replicate(), Replicate()), False),
        ("embed", (10, 4), F32, "m", None, (Replicate(), Shard(0)), False),
    ]),
    ("pp 2 x fsdp 2", {"m": ((2, 2), ("pp", "dp_shard"))}, ("m", "pp"), False, [
        ("w", (8, 6), F32, "m", ("dp_shard",), (Shard(0),), True),
        ("norm", (6,), F32, "m", ("dp_shard",), (Replicate(),), True),
        ("odd", (3, 5), F32, "m", ("dp_shard",), (Shard(0),), True),  # uneven: a shard of 1 row
    ]),
    ("pp 2 x ddp 2 (plain tensors)", {"m": ((2, 2), ("pp", "dp_replicate"))}, ("m", "pp"), False, [
        ("w", (8, 6), F32, None, None, None, True),
        ("b", (6,), F32, None, None, None, True),
    ]),
    ("ep 2x2 + dense fsdp 4", {"d": ((4,), ("fsdp",)), "e": ((2, 2), ("efsdp", "ep"))}, None, True, [
        ("dense", (8, 6), F32, "d", None, (Shard(0),), False),
        ("dense_norm", (6,), F32, "d", None, (Replicate(),), False),
        ("experts_w1", (4, 6, 8), F32, "e", None, (Shard(1), Shard(0)), False),
        ("experts_w2", (4, 8, 6), F32, "e", None, (Shard(1), Shard(0)), False),
    ]),
    ("pp 2 x (efsdp 1, ep 2) 3-D + dense", {"e": ((2, 1, 2), ("pp", "efsdp", "ep")), "d": ((2, 2), ("pp", "fsdp"))},
     ("e", "pp"), True, [
        ("dense", (8, 6), F32, "d", ("fsdp",), (Shard(0),), True),
        ("experts", (4, 6, 8), F32, "e", ("efsdp", "ep"), (Shard(1), Shard(0)), True),
        ("router", (6, 4), F32, "d", ("fsdp",), (Replicate(),), True),
    ]),
]


def seeded(case: str, name: str, stage: int, shape, dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case}/{name}/{stage}".encode()))
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def reference_tensors(case) -> list[torch.Tensor]:
    """The whole model's gradients, each element once: every tensor of every stage, as float64."""
    label, meshes, pp, _, tensors = case
    stages = meshes[pp[0]][0][0] if pp else 1
    return [
        seeded(label, name, stage, shape, dtype).double()
        for stage in range(stages)
        for name, shape, dtype, _, _, _, per_stage in tensors
        if per_stage or stage == 0
    ]


# --------------------------------------------------------------------------------------------------------
# Rank side.
# --------------------------------------------------------------------------------------------------------

def _build(case):
    """This rank's parameters for ``case``, with seeded gradients; and the pipeline mesh."""
    label, mesh_specs, pp, _, tensors = case
    meshes = {key: cached_mesh(*spec) for key, spec in mesh_specs.items()}
    pp_mesh = meshes[pp[0]][pp[1]] if pp else None
    stage = pp_mesh.get_local_rank() if pp else 0
    params = []
    for name, shape, dtype, key, dims, placements, per_stage in tensors:
        full = seeded(label, name, stage if per_stage else 0, shape, dtype)
        if placements is None:
            param = nn.Parameter(torch.zeros(shape, dtype=dtype))
            param.grad = full
        else:
            mesh = meshes[key] if dims is None else meshes[key][dims]
            param = nn.Parameter(distribute_tensor(torch.zeros(shape, dtype=dtype), mesh, placements,
                                                   src_data_rank=None))
            param.grad = distribute_tensor(full, mesh, placements, src_data_rank=None)
        params.append(param)
    return params, pp_mesh


def _record(norm, params, comms):
    """The returned norm, and this rank's local gradients afterwards (compared with the ones before times the
    reference coefficient in the test process: no collective to gather them)."""
    return dict(kind=type(norm).__name__, dtype=norm.dtype, value=norm.detach().clone(), comms=comms,
                grads=[local(p.grad).detach().clone() for p in params])


def _rank_case(case, norm_types, with_torchtitan):
    params, pp_mesh = _build(case)
    ep_enabled = case[3]
    saved = [local(p.grad).clone() for p in params]
    out = []
    for p in norm_types:
        entry = {}
        for api in ("distclip", "torchtitan") if with_torchtitan else ("distclip",):
            for param, grad in zip(params, saved):
                local(param.grad).copy_(grad)
            clip = dc_torchtitan.clip_grad_norm_ if api == "distclip" else torchtitan_clip
            with CommDebugMode() as mode:
                norm = clip(params, MAX_NORM, p, pp_mesh=pp_mesh, ep_enabled=ep_enabled)
            entry[api] = _record(norm, params, mode.get_total_counts())
        out.append(entry)
    return dict(before=saved, clips=out)


def _rank_nonfinite(case):
    """A NaN in one gradient of the last rank, error_if_nonfinite=True: every rank raises, none changes."""
    params, pp_mesh = _build(case)
    if dist.get_rank() == WORLD_SIZE - 1:
        local(params[0].grad).view(-1)[0] = float("nan")
    before = [local(p.grad).clone() for p in params]
    try:
        dc_torchtitan.clip_grad_norm_(params, MAX_NORM, 2.0, error_if_nonfinite=True, pp_mesh=pp_mesh)
        error = None
    except RuntimeError as err:
        error = str(err)
    unchanged = all(torch.allclose(local(p.grad), b, rtol=0, atol=0, equal_nan=True) for p, b in zip(params, before))
    return error, unchanged


# --------------------------------------------------------------------------------------------------------
# Test side.
# --------------------------------------------------------------------------------------------------------


def _run(worlds, norm_types, with_torchtitan):
    return worlds(WORLD_SIZE).run(_rank_cases, norm_types, with_torchtitan, timeout=TIMEOUT_S)


def _rank_cases(norm_types, with_torchtitan):
    return [_rank_case(case, norm_types, with_torchtitan) for case in CASES]


def _tolerance(case, api):
    """torch's norm of a bf16 gradient is a bf16 number (8 bits of mantissa): torchtitan's norm is that
    close, where distclip's, computed in float32 and combined in float64, is within 1e-5."""
    has_bf16 = any(t[2] == BF16 for t in case[4])
    return 2.0**-7 if api == "torchtitan" and has_bf16 else REL_TOL


def _check_against_float64(case, entries, norm_types, api):
    label, _, _, _, tensors = case
    ref_tensors = reference_tensors(case)
    rel_tol = _tolerance(case, api)
    dtype = torch.float32  # every case has float32 gradients (bf16 ones promote to float32)
    for j, p in enumerate(norm_types):
        ref = reference_norm(ref_tensors, p)
        values = []
        for r, rank_entries in enumerate(entries):
            got = rank_entries["clips"][j][api]
            what = f"{label} p={p} rank {r} {api}"
            assert got["kind"] == "Tensor", what  # a plain tensor, not a DTensor, as torchtitan returns
            assert got["dtype"] == dtype, what
            assert math.isclose(got["value"].item(), ref, rel_tol=rel_tol), (what, got["value"].item(), ref)
            values.append(got["value"])
            if api == "distclip":
                assert got["comms"] == 1, (what, got["comms"])
            c = clip_coefficient(MAX_NORM, ref if api == "distclip" else got["value"].item())
            for name, grad, before in zip([t[0] for t in tensors], got["grads"], rank_entries["before"]):
                want = (before.double() * c).to(grad.dtype)
                rtol, atol = (GRAD_RTOL, GRAD_ATOL) if grad.dtype == torch.float32 else (1e-2, 1e-2)  # bf16 ulps
                torch.testing.assert_close(grad, want, rtol=rtol, atol=atol, msg=f"{what} {name}")
        if api == "distclip":
            assert all(torch.equal(v, values[0]) for v in values), f"{label} p={p}: ranks differ: {values}"


def test_matches_float64_on_every_layout(worlds):
    """Every layout, p = 2, 3, inf and -inf: the norm of the whole model's gradient (both stages, dense
    parameters and experts, every element once) to 1e-5, a plain float32 tensor, the same bits on every rank,
    one collective, and the gradients scaled by the float64 coefficient."""
    norm_types = (*NORM_TYPES, -INF)
    results = _run(worlds, norm_types, with_torchtitan=False)
    for i, case in enumerate(CASES):
        _check_against_float64(case, [res[i] for res in results], norm_types, "distclip")


@needs_torchtitan
def test_matches_torchtitan_clip(worlds):
    """The same layouts, p = 2, 3, inf, beside torchtitan's own clip on the same gradients: torchtitan is
    checked against float64 too (so the layouts are torchtitan's), then distclip's norm against torchtitan's
    (rel 1e-6: both float32, distclip's rounded from float64) with the same type and dtype, and the clipped
    gradients against torchtitan's. torchtitan makes more collectives: one per sharded mesh dimension and
    one for the pipeline (for the expert cases, per expert and dense mesh)."""
    results = _run(worlds, NORM_TYPES, with_torchtitan=True)
    for i, case in enumerate(CASES):
        entries = [res[i] for res in results]
        _check_against_float64(case, entries, NORM_TYPES, "torchtitan")
        for r, rank_entries in enumerate(entries):
            for j, p in enumerate(NORM_TYPES):
                ours, theirs = rank_entries["clips"][j]["distclip"], rank_entries["clips"][j]["torchtitan"]
                what = f"{case[0]} p={p} rank {r}"
                assert (ours["kind"], ours["dtype"]) == (theirs["kind"], theirs["dtype"]), what
                assert ours["value"].shape == theirs["value"].shape == (), what
                rel_tol = _tolerance(case, "torchtitan")
                assert math.isclose(ours["value"].item(), theirs["value"].item(), rel_tol=rel_tol), what
                assert theirs["comms"] >= ours["comms"] == 1, (what, theirs["comms"])
                for a, b in zip(ours["grads"], theirs["grads"]):
                    rtol = max(2 * rel_tol, 1e-2 if a.dtype == BF16 else 0)
                    torch.testing.assert_close(a, b, rtol=rtol, atol=1e-7, msg=what)


@needs_torchtitan
def test_one_process_is_bitwise_torchtitan():
    """Without pp_mesh and with plain tensors torchtitan's clip is torch's; so is distclip's, bitwise: the
    norm's bits, dtype and device, and the gradients afterwards, for several p and mixed dtypes."""
    for p in (2.0, 1.0, 0.5, INF, -INF, 0.0):
        results = []
        for clip in (torchtitan_clip, dc_torchtitan.clip_grad_norm_):
            params = [nn.Parameter(torch.zeros(s, dtype=d)) for s, d in (((7, 5), F32), ((3,), F32), ((4, 4), BF16))]
            for k, param in enumerate(params):
                param.grad = seeded("one process", str(k), 0, param.shape, param.dtype)
            norm = clip(params, 0.5, p)
            results.append((norm, [param.grad for param in params]))
        (norm_tt, grads_tt), (norm_dc, grads_dc) = results
        assert norm_tt.dtype == norm_dc.dtype and norm_tt.device == norm_dc.device, p
        assert torch.equal(norm_tt, norm_dc), (p, norm_tt, norm_dc)
        assert all(torch.equal(a, b) for a, b in zip(grads_tt, grads_dc)), p


def test_nonfinite_raises_on_every_rank(worlds):
    """error_if_nonfinite with a NaN on one rank of the second pipeline stage: distclip checks the reduced
    norm, so every rank of both stages raises together and no gradient changes (torchtitan checks each
    stage's own norm before the pipeline reduction: only the stage with the NaN would raise)."""
    outcomes = worlds(WORLD_SIZE).run(_rank_nonfinite, CASES[1], timeout=TIMEOUT_S)
    for r, (error, unchanged) in enumerate(outcomes):
        assert error is not None and "non-finite" in error, (r, error)
        assert unchanged, r


def test_ep_enabled_refuses_plain_parameters():
    """What torchtitan asserts with ep_enabled, as a ValueError naming the parameter."""
    param = nn.Parameter(torch.zeros(3))
    param.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"parameters\[0\]"):
        dc_torchtitan.clip_grad_norm_([param], 1.0, ep_enabled=True)
