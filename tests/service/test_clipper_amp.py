"""GradClipper with a GradScaler (AMP): it unscales before measuring, as ``scaler.unscale_`` then torch's
clip, with or without a fused optimizer, overflowing steps skipped by the scaler; and it refuses gradients
that are still scaled, or already stepped."""

import math

import pytest
import torch

import distclip

from _service_helpers import _model


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
