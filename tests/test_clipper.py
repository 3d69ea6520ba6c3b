"""GradClipper: the report, non-finite policies, thresholds in the clip, AGC, AMP, fused optimizers, state
resume, the absence of host synchronisation, and the same decisions on every rank of real gloo worlds.

Rank-side functions are at module level (the harness pickles them by reference). Nothing is mocked; the one
patch is the host-synchronisation trap, which makes ``Tensor.item``/``tolist``/``cpu``/``numpy``/``bool()``/
``float()``/``int()`` raise while ``clip_()`` runs.
"""

import contextlib
import copy
import io
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distclip

INF, NAN = math.inf, math.nan
POLICIES = {
    "fixed": lambda: None,
    "autoclip": lambda: distclip.AutoClip(percentile=50),
    "zclip": lambda: distclip.ZClip(warmup_steps=3),
    "spikeskip": lambda: distclip.SpikeSkip(window=8, min_history=3, sigma=3.0),
    "agc": lambda: distclip.AGC(clipping=0.05),
    "all": lambda: [distclip.AutoClip(50), distclip.ZClip(warmup_steps=3), distclip.SpikeSkip(8, 3.0, 3)],
}


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))).to(dtype)


def _backward(model, seed, scale=1.0):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(seed), dtype=next(model.parameters()).dtype)
    (model(x).square().sum() * scale).backward()


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _norm_sequence(steps):
    """Scales of the gradients step by step: smooth, then a spike at step 9, then smooth again."""
    return [1.0 + 0.1 * math.sin(t) for t in range(steps)] if steps < 9 else (
        [1.0 + 0.1 * math.sin(t) for t in range(9)] + [30.0] + [1.0 + 0.1 * math.cos(t) for t in range(steps - 10)]
    )


_TRAPPED = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def _no_host_sync():
    """Every way of reading a tensor on the host raises inside the block."""
    originals = {name: getattr(torch.Tensor, name) for name in _TRAPPED}

    def trap(name):
        def raising(self, *args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name}() inside clip_()")

        return raising

    for name in _TRAPPED:
        setattr(torch.Tensor, name, trap(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


# ---------------------------------------------------------------------------------------------- fixed max_norm


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 3.5])
def test_fixed_threshold_is_bitwise_torch(norm_type):
    model, reference = _model(), _model()
    for m in (model, reference):
        _backward(m, 0)
    report = distclip.GradClipper(model, 0.5, norm_type).clip_()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5, norm_type)
    assert torch.equal(report.norm, norm) and report.norm.dtype == norm.dtype
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_report_fields_and_as_dict():
    model = _model()
    clipper = distclip.GradClipper(model, 0.5)
    _backward(model, 0)
    first = clipper.clip_()
    model.zero_grad()
    _backward(model, 1, scale=1e-3)  # a norm below 0.5
    second = clipper.clip_()
    assert float(first.threshold) == 0.5 and bool(first.clipped) and not bool(second.clipped)
    assert float(first.coefficient) == pytest.approx(0.5 / (float(first.norm) + 1e-6))
    assert float(first.post_norm) == pytest.approx(0.5, rel=1e-5)
    assert float(second.coefficient) == 1.0 and float(second.post_norm) == float(second.norm)
    assert (int(second.steps), int(second.clipped_steps), float(second.clip_rate)) == (2, 1, 0.5)
    assert not first.may_skip and not first.skipped and not bool(first.nonfinite)
    logged = first.as_dict("grad/", host=True)
    assert set(logged) == {f"grad/{k}" for k in ("norm", "post_norm", "threshold", "coefficient", "clipped",
                                                 "nonfinite", "clip_rate")}
    assert all(type(v) is float for v in logged.values()) and logged["grad/clipped"] == 1.0
    on_device = first.as_dict()
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in on_device.values())
    assert on_device["norm"].item() == logged["grad/norm"]


def test_per_parameter_and_per_module_norms():
    model = _model()
    _backward(model, 0)
    grads = dict((name, p.grad.clone()) for name, p in model.named_parameters())
    for kind, p in [("parameter", 2.0), ("module", 2.0), ("parameter", INF), ("module", 1.0)]:
        for (name, param) in model.named_parameters():
            param.grad = grads[name].clone()
        report = distclip.GradClipper(model, 0.1, p, norms=kind).clip_()
        units = {}
        for name, g in grads.items():
            units.setdefault(name if kind == "parameter" else name.rpartition(".")[0], []).append(g)
        assert report.unit_names == tuple(units)
        want = [torch.linalg.vector_norm(torch.cat([g.flatten() for g in gs]), p) for gs in units.values()]
        torch.testing.assert_close(report.unit_norms, torch.stack(want))
        assert set(report.as_dict()) >= {f"norm/{name}" for name in units}


def test_parameters_target_with_declared_groups_and_index_names():
    params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(4))]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i + 1))
    report = distclip.GradClipper([params[0], params[1], params[2]], 100.0, norms="parameter").clip_()
    assert report.unit_names == ("0", "1", "2")
    assert report.unit_norms.tolist() == pytest.approx([math.sqrt(3), 2 * math.sqrt(2), 6.0])


def test_bad_options_are_rejected():
    model = _model()
    with pytest.raises(ValueError, match="nonfinite"):
        distclip.GradClipper(model, 1.0, nonfinite="ignore")
    with pytest.raises(ValueError, match="module target"):
        distclip.GradClipper(list(model.parameters()), 1.0, norms="module")
    with pytest.raises(ValueError, match="group="):
        distclip.GradClipper(model, 1.0, group=object())
    with pytest.raises(ValueError, match="max_norm"):
        distclip.GradClipper(model, -1.0)
    with pytest.raises(TypeError, match="policy"):
        distclip.GradClipper(model, 1.0, policy="zclip")
    with pytest.raises(ValueError, match="fused"):
        distclip.GradClipper(model, 1.0, fused=True, optimizer=torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="AGC"):
        opt = torch.optim.Adam(model.parameters(), fused=True)
        distclip.GradClipper(model, 1.0, policy=distclip.AGC(), fused=True, optimizer=opt)


# ---------------------------------------------------------------------------------------------- non-finite


def _poisoned(value):
    model = _model()
    _backward(model, 0)
    with torch.no_grad():
        next(model.parameters()).grad[0, 0] = value
    return model


@pytest.mark.parametrize("value", [NAN, INF])
def test_nonfinite_propagate_is_torch(value):
    model, reference = _poisoned(value), _poisoned(value)
    report = distclip.GradClipper(model, 0.5, nonfinite="propagate").clip_()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert bool(report.nonfinite) and not report.skipped
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True, rtol=0, atol=0)


def test_nonfinite_raise_changes_nothing():
    model = _poisoned(NAN)
    before = _grads(model)
    policy = distclip.ZClip(warmup_steps=2)
    with pytest.raises(RuntimeError, match="non-finite"):
        distclip.GradClipper(model, 0.5, nonfinite="raise", policy=policy).clip_()
    for g, p in zip(before, model.parameters()):
        torch.testing.assert_close(g, p.grad, equal_nan=True, rtol=0, atol=0)
    assert int(policy.state_dict()["count"]) == 0


def test_nonfinite_skip_keeps_the_gradients_and_counts():
    model = _poisoned(INF)
    before = _grads(model)
    clipper = distclip.GradClipper(model, 0.5, nonfinite="skip")
    report = clipper.clip_()
    assert report.skipped and bool(report.nonfinite) and float(report.coefficient) == 1.0
    assert int(report.skipped_steps) == 1 and not bool(report.clipped)
    for g, p in zip(before, model.parameters()):
        assert torch.equal(g, p.grad)
    model.zero_grad()
    _backward(model, 1)
    report = clipper.clip_()
    assert not report.skipped and int(report.skipped_steps) == 1 and int(report.steps) == 2


# ---------------------------------------------------------------------------------------------- policies in the clip


def test_policy_threshold_caps_with_max_norm_and_sets_the_coefficient():
    model = _model(dtype=torch.float64)
    clipper = distclip.GradClipper(model, 2.0, policy=[distclip.ZClip(warmup_steps=3), distclip.SpikeSkip(8, 3.0, 3)])
    twin = [distclip.ZClip(warmup_steps=3), distclip.SpikeSkip(8, 3.0, 3)]
    for t, scale in enumerate(_norm_sequence(14)):
        model.zero_grad()
        _backward(model, t, scale)
        before = _grads(model)
        report = clipper.clip_()
        g = report.norm.to(torch.float64)
        zclip, skip = (policy.decide(g) for policy in twin)
        assert torch.equal(report.threshold, torch.clamp(zclip, max=2.0))
        assert torch.equal(report.skip_threshold, skip)
        skipped = bool(g > skip)
        assert report.skipped == skipped, t
        coefficient = 1.0 if skipped else min(float(report.threshold) / (float(g) + 1e-6), 1.0)
        assert float(report.coefficient) == pytest.approx(coefficient, rel=1e-12)
        for b, p in zip(before, model.parameters()):
            torch.testing.assert_close(p.grad, b * coefficient, rtol=1e-12, atol=0)
    assert int(report.skipped_steps) == 1  # the spike at step 9


def test_agc_scales_each_unit_by_its_factor_and_max_norm_bounds_the_total():
    model = _model(dtype=torch.float64)
    _backward(model, 0)
    before = _grads(model)
    report = distclip.GradClipper(model, 3.0, policy=distclip.AGC(clipping=0.02)).clip_()
    coefficient = min(3.0 / (float(report.norm) + 1e-6), 1.0)
    for b, p in zip(before, model.parameters()):
        w = p.detach().reshape(p.shape[0], -1) if p.ndim > 1 else p.detach().reshape(1, -1)
        g = b.reshape(w.shape)
        factors = torch.clamp(0.02 * torch.clamp(w.norm(dim=1), min=1e-3) / torch.clamp(g.norm(dim=1), min=1e-6), max=1)
        want = (g * torch.clamp(factors, max=coefficient)[:, None]).reshape(p.shape)
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=0)
    grads_after = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(report.post_norm) == pytest.approx(float(grads_after.norm()), rel=1e-12)
    assert bool(report.clipped) and float(report.post_norm) <= 3.0


# ---------------------------------------------------------------------------------------------- resume


def _run_steps(clipper, model, scales, first_seed):
    reports = []
    for t, scale in enumerate(scales):
        model.zero_grad()
        _backward(model, first_seed + t, scale)
        report = clipper.clip_()
        reports.append((report.as_dict(host=True), _grads(model)))
    return reports


@pytest.mark.parametrize("policy", ["autoclip", "zclip", "spikeskip", "all"])
def test_resume_from_state_dict_reproduces_the_next_5_steps(policy):
    scales = _norm_sequence(16)
    model = _model()
    clipper = distclip.GradClipper(model, 10.0, policy=POLICIES[policy](), nonfinite="skip")
    _run_steps(clipper, model, scales[:8], 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "clipper": clipper.state_dict()}, buffer)
    uninterrupted = _run_steps(clipper, model, scales[8:13], 8)

    checkpoint = torch.load(io.BytesIO(buffer.getvalue()))
    resumed_model = _model(seed=1)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = distclip.GradClipper(resumed_model, 10.0, policy=POLICIES[policy](), nonfinite="skip")
    resumed.load_state_dict(checkpoint["clipper"])
    replayed = _run_steps(resumed, resumed_model, scales[8:13], 8)
    for (logged, grads), (want_logged, want_grads) in zip(replayed, uninterrupted, strict=True):
        assert logged == want_logged
        assert all(torch.equal(g, w) for g, w in zip(grads, want_grads))


def test_load_state_dict_rejects_other_policies():
    state = distclip.GradClipper(_model(), 1.0, policy=distclip.ZClip()).state_dict()
    with pytest.raises(ValueError, match="policies"):
        distclip.GradClipper(_model(), 1.0, policy=distclip.AutoClip()).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- fused optimizers


FUSED = {
    "Adam": lambda params, fused: torch.optim.Adam(params, lr=0.01, fused=fused),
    "AdamW": lambda params, fused: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, fused=fused),
    "SGD": lambda params, fused: torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=fused),
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_folding_equals_clip_then_step(name):
    folded, reference = _model(), _model()
    opt = FUSED[name](folded.parameters(), True)
    ref_opt = FUSED[name](reference.parameters(), True)
    clipper = distclip.GradClipper(folded, 0.3, fused=True, optimizer=opt, nonfinite="skip")
    for t in range(5):
        for m, o in ((folded, opt), (reference, ref_opt)):
            o.zero_grad()
            _backward(m, t)
        if t == 2:  # a non-finite step: skipped on the device by found_inf, as if never taken
            for m in (folded, reference):
                next(m.parameters()).grad[0, 0] = NAN
        report = clipper.clip_()
        clipper.step(report)
        if t != 2:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.3)
            ref_opt.step()
        assert bool(report.skip) == (t == 2)
        for p, q in zip(folded.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


def test_fused_step_reads_nothing_on_the_host():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    clipper = distclip.GradClipper(model, 0.3, fused=True, optimizer=opt, policy=POLICIES["all"](), nonfinite="skip")
    for t in range(4):
        opt.zero_grad()
        _backward(model, t)
        with _no_host_sync():
            clipper.step(clipper.clip_())


# ---------------------------------------------------------------------------------------------- AMP


def _amp_step(model, opt, scaler, seed, clip):
    opt.zero_grad()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(seed))
    scaler.scale(model(x).square().sum()).backward()
    clip()
    scaler.update()


@pytest.mark.parametrize("init_scale", [2.0**12, 2.0**126], ids=["fits", "overflows"])
@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_is_unscaled_before_measuring(fused, init_scale):
    model, reference = _model(), _model()
    opt, ref_opt = (torch.optim.Adam(m.parameters(), lr=0.01, fused=fused) for m in (model, reference))
    scaler, ref_scaler = (torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1) for _ in range(2))
    clipper = distclip.GradClipper(model, 0.4, scaler=scaler, optimizer=opt, fused=fused)

    def ours():
        report = clipper.clip_()
        clipper.step(report)
        norms.append(float(report.norm))

    def theirs():
        ref_scaler.unscale_(ref_opt)
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.4)))
        ref_scaler.step(ref_opt)

    norms, ref_norms = [], []
    for t in range(6):
        _amp_step(model, opt, scaler, t, ours)
        _amp_step(reference, ref_opt, ref_scaler, t, theirs)
    assert norms == pytest.approx(ref_norms, rel=1e-6, nan_ok=True)
    assert scaler.get_scale() == ref_scaler.get_scale()
    finite = [n for n in norms if math.isfinite(n)]
    assert finite and max(finite) < 100  # unscaled
    assert (len(finite) < len(norms)) == (init_scale > 2.0**100)  # overflow steps: the scaler skips them
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


def test_grad_scaler_errors_when_gradients_are_still_scaled():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    scaler.scale(model(x).square().sum()).backward()
    with pytest.raises(RuntimeError, match="still scaled"):
        distclip.GradClipper(model, 1.0, scaler=scaler).clip_()
    scaler.unscale_(opt)
    distclip.GradClipper(model, 1.0, scaler=scaler).clip_()  # unscaled by hand: fine
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after scaler.step"):
        distclip.GradClipper(model, 1.0, scaler=scaler, optimizer=opt).clip_()
    with pytest.raises(ValueError, match="raise"):
        distclip.GradClipper(model, 1.0, scaler=scaler, nonfinite="raise")


# ---------------------------------------------------------------------------------------------- no host sync


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_clip_performs_no_host_synchronisation(policy, nonfinite):
    model = _model()
    clipper = distclip.GradClipper(model, 0.5, policy=POLICIES[policy](), nonfinite=nonfinite, norms="module")
    for t, scale in enumerate(_norm_sequence(12)):
        model.zero_grad()
        _backward(model, t, scale)
        with _no_host_sync():
            report = clipper.clip_()
            report.as_dict("grad/")
    assert int(report.steps) == 12


def test_the_trap_catches_a_host_read():
    with pytest.raises(AssertionError, match="host synchronisation"), _no_host_sync():
        bool(torch.ones(()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_clip_performs_no_cuda_synchronisation():
    """On a GPU, torch's own detector: any synchronising call inside clip_() and the fused step raises."""
    model = _model().cuda()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    fused = distclip.GradClipper(model, 0.5, policy=POLICIES["all"](), nonfinite="skip", norms="parameter",
                                 optimizer=opt, fused=True)
    agc = distclip.GradClipper(model, 0.5, policy=[distclip.AGC(), distclip.ZClip(warmup_steps=2)], nonfinite="skip")
    for t in range(5):
        opt.zero_grad()
        model(torch.randn(8, 6, device="cuda")).square().sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fused.step(fused.clip_())
            agc.clip_()
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------- distributed


def _rank_sharded_run(steps, trap):
    """Each rank holds its own, differently sized pieces of one logical float64 vector (group=WORLD); the
    vector's scale follows _norm_sequence. Returns every step's report and gradients, the state after step 10
    and a resumed clipper's reports for steps 11..15."""
    rank = dist.get_rank()
    full = torch.randn(23, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pieces = full.split([3, 4, 9, 7])
    mine = [pieces[0], pieces[1]] if rank == 0 else [pieces[2], pieces[3]]
    params = [nn.Parameter(torch.zeros_like(p)) for p in mine]

    def make():
        return distclip.GradClipper(params, 20.0, policy=POLICIES["all"](), nonfinite="skip", norms="parameter",
                                    group=dist.group.WORLD)

    def step(clipper, t, scale, trapped):
        for p, piece in zip(params, mine):
            p.grad = piece * scale * (1 + 0.01 * t)
        if t == 12:
            params[0].grad[0] = NAN if rank == 1 else params[0].grad[0]  # one rank's NaN: a skip on both
        with _no_host_sync() if trap and trapped else contextlib.nullcontext():
            report = clipper.clip_()
        return report.as_dict(host=True), [p.grad.clone() for p in params]

    clipper, results, state = make(), [], None
    for t, scale in enumerate(_norm_sequence(steps)):
        results.append(step(clipper, t, scale, t > 0))  # the first call checks the ranks' arguments
        if t == 10:
            state = copy.deepcopy(clipper.state_dict())
    resumed = make()
    resumed.load_state_dict(state)
    replay = [step(resumed, t, scale, t > 11) for t, scale in enumerate(_norm_sequence(steps)) if 10 < t <= 15]
    return dict(results=results, replay=replay, state=clipper.state_dict())


def test_sharded_ranks_take_the_same_decisions_and_skip_together(worlds):
    steps = 16
    r0, r1 = worlds(2).run(_rank_sharded_run, steps, True)
    full = torch.randn(23, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for t, scale in enumerate(_norm_sequence(steps)):
        a, b = r0["results"][t][0], r1["results"][t][0]
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a), t  # same bits
        if t != 12:
            assert a["norm"] == pytest.approx(float(full.norm()) * scale * (1 + 0.01 * t), rel=1e-12)
        assert a["skipped"] == float(t in (9, 12)), t  # the spike, and one rank's NaN
    assert r0["results"][12][0]["nonfinite"] == 1.0
    for rank_result in (r0, r1):  # skipped steps leave the gradients as they were
        spike_grads = rank_result["results"][9][1]
        assert max(float(g.abs().max()) for g in spike_grads) > 5
    for k, a in r0["state"]["counters"].items():
        assert torch.equal(a, r1["state"]["counters"][k])
    for a, b in zip(r0["state"]["policies"], r1["state"]["policies"]):
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    for r in (r0, r1):  # resumed after step 10: the same next 5 steps
        for (d, g), (d2, g2) in zip(r["replay"], r["results"][11:16]):
            assert d == pytest.approx(d2, nan_ok=True)
            assert all(torch.equal(x, y) or torch.isnan(x).any() for x, y in zip(g, g2))


def _rank_dtensor_agc():
    """AGC over DTensors on a 1-D mesh of 2 ranks: rows local (Shard(0)), rows split (Shard(1)), a sharded
    1-D bias, a replicated weight. Returns the full gradients before and after, the weights, the number of
    collectives, and the per-parameter norms."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(3)
    layout = [((6, 4), Shard(0)), ((5, 6), Shard(1)), ((7,), Shard(0)), ((3, 2), Replicate())]
    params = []
    for shape, placement in layout:
        weight = torch.randn(shape, generator=gen, dtype=torch.float64)
        grad = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
        param = nn.Parameter(distribute_tensor(weight, mesh, [placement], src_data_rank=None))
        param.grad = distribute_tensor(grad, mesh, [placement], src_data_rank=None)
        params.append(param)
    before = [p.grad.full_tensor() for p in params]
    clipper = distclip.GradClipper(params, 4.0, policy=distclip.AGC(clipping=0.3), norms="parameter")
    clipper.clip_()  # the first call also checks the ranks' arguments
    for p, g in zip(params, before):
        p.grad = distribute_tensor(g.clone(), mesh, p.placements, src_data_rank=None)
    with CommDebugMode() as comms:
        report = clipper.clip_()
    return dict(
        before=before, after=[p.grad.full_tensor() for p in params], weights=[p.detach().full_tensor() for p in params],
        collectives=comms.get_total_counts(), report=report.as_dict(host=True),
    )


def test_agc_on_sharded_rows_equals_agc_on_the_full_tensors(worlds):
    results = worlds(2).run(_rank_dtensor_agc)
    r = results[0]
    total = torch.cat([g.flatten() for g in r["before"]]).norm()
    coefficient = min(4.0 / (float(total) + 1e-6), 1.0)
    for w, g, after in zip(r["weights"], r["before"], r["after"]):
        rows_w = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
        rows_g = g.reshape(rows_w.shape)
        factors = torch.clamp(0.3 * torch.clamp(rows_w.norm(dim=1), min=1e-3) / rows_g.norm(dim=1), max=1)
        want = (rows_g * torch.clamp(factors, max=coefficient)[:, None]).reshape(g.shape)
        torch.testing.assert_close(after, want, rtol=1e-12, atol=0)
    # the norm, the AGC sums over the mesh (one for the Shard(1) weight and the 1-D bias), the post-clip
    # norm, and the per-parameter norms
    assert r["collectives"] == 4
    assert r["report"]["norm"] == pytest.approx(float(total), rel=1e-12)
    assert [r["report"][f"norm/{i}"] for i in range(4)] == pytest.approx([float(g.norm()) for g in r["before"]])
    assert results[1]["report"] == r["report"]


def _rank_wrapped_models():
    """FSDP2 with AGC and per-parameter norms (named like the unwrapped model); DDP's names; FSDP1 refused."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    out = {}
    model = _model()
    for layer in [model[0], model[2][0], model[2][1]]:
        fully_shard(layer)
    fully_shard(model)
    _backward(model, dist.get_rank())
    before = [p.grad.full_tensor() for p in model.parameters()]
    report = distclip.GradClipper(model, INF, policy=distclip.AGC(0.05), norms="parameter").clip_()
    out["fsdp2_names"] = report.unit_names
    out["fsdp2_norms"] = report.unit_norms.tolist()
    after = [p.grad.full_tensor() for p in model.parameters()]
    out["fsdp2"] = (before, after, [p.detach().full_tensor() for p in model.parameters()])

    ddp = nn.parallel.DistributedDataParallel(_model())
    _backward(ddp, dist.get_rank())
    out["ddp_names"] = distclip.GradClipper(ddp, 1.0, norms="module").clip_().unit_names

    fsdp1 = FullyShardedDataParallel(_model(), device_id=torch.device("cpu"), use_orig_params=True)
    for options in [dict(policy=distclip.AGC()), dict(norms="parameter")]:
        try:
            distclip.GradClipper(fsdp1, 1.0, **options)
        except ValueError as err:
            out.setdefault("fsdp1", []).append(str(err))
    return out


def test_wrapped_models(worlds):
    r = worlds(2).run(_rank_wrapped_models)[0]
    names = tuple(name for name, _ in _model().named_parameters())
    assert r["fsdp2_names"] == names and r["ddp_names"] == ("0", "2.0", "2.1")
    before, after, weights = r["fsdp2"]
    assert r["fsdp2_norms"] == pytest.approx([float(g.norm()) for g in before], rel=1e-5)
    for w, g, a in zip(weights, before, after):
        rows_w = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
        rows_g = g.reshape(rows_w.shape)
        factors = torch.clamp(0.05 * torch.clamp(rows_w.norm(dim=1), min=1e-3) / rows_g.norm(dim=1), max=1)
        torch.testing.assert_close(a, (rows_g * factors[:, None]).reshape(g.shape))
    assert len(r["fsdp1"]) == 2 and all("FSDP1" in e for e in r["fsdp1"])


def _rank_raise_on_nonfinite():
    """Rank 1's piece holds a NaN: with nonfinite="raise" both ranks raise, and no gradient changed."""
    piece = torch.full((3,), 2.0 + dist.get_rank())
    if dist.get_rank() == 1:
        piece[1] = NAN
    param = nn.Parameter(torch.zeros(3))
    param.grad = piece.clone()
    try:
        distclip.GradClipper([param], 0.1, nonfinite="raise", group=dist.group.WORLD).clip_()
    except RuntimeError as err:
        return str(err), torch.equal(param.grad.nan_to_num(), piece.nan_to_num())
    return None, False


def test_sharded_nonfinite_raise_raises_on_every_rank(worlds):
    for message, unchanged in worlds(2).run(_rank_raise_on_nonfinite):
        assert message is not None and "non-finite" in message and unchanged
