"""The threshold policies, each against its formula written out here in plain Python floats, on known norm
sequences (spikes, NaN and inf included); configuration errors; and how ``decide`` combines them."""

import math
import statistics

import pytest
import torch

import distclip
from distclip._service import policies as _policies

from _service_helpers import INF, NAN, _policy_decisions, _policy_norms


# --------------------------------------------------------------------------------------------------- AutoClip


def _autoclip_reference(norms, q, bins_per_octave, low=-64):
    """Upper edge of the log2 bin of the nearest-rank q-th percentile of the finite norms so far."""
    seen, out = [], []
    for g in norms:
        if math.isfinite(g):
            seen.append(g)
        if not seen:
            out.append(INF)
            continue
        ranked = sorted(seen)
        x = ranked[max(1, math.ceil(q / 100 * len(ranked))) - 1]
        b = math.floor((math.log2(x) - low) * bins_per_octave) if x > 0 else 0
        out.append(2.0 ** (low + (b + 1) / bins_per_octave))
    return out, seen


@pytest.mark.parametrize("q", [10.0, 50.0, 90.0, 100.0])
def test_autoclip_is_the_bin_edge_of_the_nearest_rank_percentile(q):
    norms = _policy_norms()
    got = _policy_decisions(distclip.AutoClip(percentile=q), norms)
    want, _ = _autoclip_reference(norms, q, 32)
    assert got == pytest.approx(want, rel=1e-12)


def test_autoclip_is_within_one_bin_above_the_exact_percentile():
    norms = [n for n in _policy_norms(300, seed=3) if math.isfinite(n) and n > 0]
    policy = distclip.AutoClip(percentile=25.0, bins_per_octave=16)
    for t, tau in enumerate(_policy_decisions(policy, norms)):
        ranked = sorted(norms[: t + 1])
        exact = ranked[max(1, math.ceil(0.25 * len(ranked))) - 1]
        assert exact <= tau < exact * 2 ** (1 / 16)


def test_autoclip_memory_is_fixed():
    policy = distclip.AutoClip(bins_per_octave=8, min_exponent=-10, max_exponent=10)
    _policy_decisions(policy, _policy_norms(500))
    (counts,) = policy.state_dict().values()
    assert counts.shape == (160,) and int(counts.sum()) == 498  # the NaN and the inf are not recorded


def test_autoclip_before_any_finite_norm_does_not_clip():
    assert _policy_decisions(distclip.AutoClip(), [NAN, INF]) == [INF, INF]


# ------------------------------------------------------------------------------------------------------ ZClip


def _zclip_reference(norms, alpha, z_thr, warmup, eps):
    buffer, mean, var, out = [], 0.0, 0.0, []
    for g in norms:
        if not math.isfinite(g):
            out.append(INF)
            continue
        if len(buffer) < warmup:
            buffer.append(g)
            out.append(INF)
            if len(buffer) == warmup:
                mean = sum(buffer) / warmup
                var = sum((x - mean) ** 2 for x in buffer) / warmup
            continue
        std = math.sqrt(var)
        z = (g - mean) / (std + eps)
        tau = mean + z_thr**2 * std / z if z > z_thr else INF
        x = min(g, tau)
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
        out.append(tau)
    return out


@pytest.mark.parametrize("alpha, z_thr, warmup", [(0.97, 2.5, 25), (0.9, 1.5, 5)])
def test_zclip_follows_its_ema_and_zscore_formula(alpha, z_thr, warmup):
    norms = _policy_norms()
    got = _policy_decisions(distclip.ZClip(alpha=alpha, z_threshold=z_thr, warmup_steps=warmup), norms)
    want = _zclip_reference(norms, alpha, z_thr, warmup, 1e-6)
    assert got == pytest.approx(want, rel=1e-12)
    assert sum(math.isfinite(t) for t in got) >= 3  # the spikes were clipped


def test_zclip_clips_a_spike_to_below_it():
    policy = distclip.ZClip(warmup_steps=4)
    _policy_decisions(policy, [1.0, 1.1, 0.9, 1.0, 1.05])
    (tau,) = _policy_decisions(policy, [10.0])
    assert 1.0 < tau < 10.0


# -------------------------------------------------------------------------------------------------- SpikeSkip


def _spike_reference(norms, window, sigma, min_history):
    kept, out = [], []
    for g in norms:
        recent = kept[-window:]
        tau = statistics.fmean(recent) + sigma * statistics.stdev(recent) if len(recent) >= min_history else INF
        out.append(tau)
        if math.isfinite(g) and g <= tau:
            kept.append(g)
    return out


@pytest.mark.parametrize("window, sigma, min_history", [(128, 6.0, 16), (10, 2.0, 4), (5, 0.5, 5)])
def test_spike_skip_against_its_window(window, sigma, min_history):
    norms = _policy_norms()
    got = _policy_decisions(distclip.SpikeSkip(window=window, sigma=sigma, min_history=min_history), norms)
    assert got == pytest.approx(_spike_reference(norms, window, sigma, min_history), rel=1e-9)


def test_spike_skip_fires_on_the_spikes_only():
    norms = _policy_norms()
    thresholds = _policy_decisions(distclip.SpikeSkip(window=32, sigma=5.0, min_history=8), norms)
    skipped = [i for i, (g, t) in enumerate(zip(norms, thresholds)) if math.isfinite(g) and g > t]
    assert skipped == [30, 31, 70]


# ------------------------------------------------------------------------------ configuration and combination


@pytest.mark.parametrize(
    "make",
    [
        lambda: distclip.AutoClip(percentile=0),
        lambda: distclip.AutoClip(percentile=101),
        lambda: distclip.ZClip(alpha=1.0),
        lambda: distclip.ZClip(warmup_steps=0),
        lambda: distclip.SpikeSkip(window=4, min_history=5),
        lambda: distclip.SpikeSkip(min_history=1),
        lambda: distclip.AGC(clipping=0),
    ],
)
def test_bad_configurations_are_rejected(make):
    with pytest.raises(ValueError, match="distclip"):
        make()


def test_decide_takes_the_smallest_clip_and_skip_thresholds():
    policies = [distclip.ZClip(warmup_steps=1), distclip.AutoClip(percentile=100), distclip.SpikeSkip(min_history=2)]
    for g in [1.0, 1.2, 0.8, 0.9]:
        decision = _policies.decide(policies, torch.tensor(g, dtype=torch.float64), max_norm=1.1)
    autoclip_tau = 2.0 ** (-64 + (math.floor((math.log2(1.2) + 64) * 32) + 1) / 32)
    assert decision.clip_threshold.item() == pytest.approx(min(1.1, autoclip_tau))
    window = [1.0, 1.2, 0.8]  # 0.9 came after the threshold was taken
    assert decision.skip_threshold.item() == pytest.approx(statistics.fmean(window) + 6 * statistics.stdev(window))
