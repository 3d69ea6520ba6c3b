r"""Threshold policies: adaptive clipping thresholds and spike skipping, computed from the global norm alone.

A policy sees one number per step, the pre-clip total norm `g_t` (a 0-d tensor, the same bits on every
rank), and returns the norm above which it acts: a clip threshold (`AutoClip`, `ZClip`) or a
skip threshold (`SpikeSkip`). Its state (histories, EMAs, counters) is a few tensors on the norm's
device, updated with branch-free tensor arithmetic, so a decision never synchronises the host with the device
and every rank holds the same state bits. ``state_dict()`` returns those tensors; loading them restores the
exact same future decisions.

A non-finite norm is never recorded: it leaves every state unchanged and meets a threshold of ``inf`` (no
clip, no skip); the clipper's ``nonfinite=`` policy decides what happens to such a step.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from distclip._clip.arguments import require


class Policy:
    """Base of the threshold policies: state handling shared by all of them.

    Subclasses set `action` (``"clip"``: the threshold caps the norm; ``"skip"``: a norm above it skips
    the step), and implement `_initial_state` and `_decide`.
    """

    action: ClassVar[str] = "clip"

    def __post_init__(self) -> None:
        self._state: dict[str, Tensor] | None = None

    def decide(self, norm: Tensor) -> Tensor:
        """Record ``norm`` (a 0-d tensor) and return this step's threshold, a 0-d float64 tensor beside it."""
        state = self._state_on(norm.device)
        threshold, new_state = self._decide(norm.detach().to(torch.float64), state)
        for name, value in new_state.items():
            state[name] = value
        return threshold

    def state_dict(self) -> dict[str, Tensor]:
        """The policy's state: tensors, copied (fresh ones before the first step)."""
        state = self._state if self._state is not None else self._initial_state(torch.device("cpu"))
        return {name: value.clone() for name, value in state.items()}

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Restore a `state_dict`; it must come from a policy of the same type and configuration."""
        expected = self._initial_state(torch.device("cpu"))
        if set(state_dict) != set(expected):
            raise ValueError(
                f"distclip: a {type(self).__name__} state has the keys {sorted(expected)}, got {sorted(state_dict)}"
            )
        for name, value in expected.items():
            loaded = state_dict[name]
            if not isinstance(loaded, Tensor) or loaded.shape != value.shape:
                raise ValueError(
                    f"distclip: {type(self).__name__} state {name!r} must be a tensor of shape "
                    f"{tuple(value.shape)} (the configuration of the policy that saved it must match), got "
                    f"{getattr(loaded, 'shape', type(loaded).__name__)}"
                )
        device = next(iter(self._state.values())).device if self._state else torch.device("cpu")
        self._state = {name: state_dict[name].detach().to(device, expected[name].dtype, copy=True) for name in expected}

    def _state_on(self, device: torch.device) -> dict[str, Tensor]:
        if self._state is None:
            self._state = self._initial_state(device)
        elif next(iter(self._state.values())).device != device:
            self._state = {name: value.to(device) for name, value in self._state.items()}
        return self._state

    def _initial_state(self, device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def _decide(self, norm: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


@dataclass(eq=False)
class AutoClip(Policy):
    r"""AutoClip (Seetharaman et al., 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
    Networks"): the threshold is the ``percentile``-th percentile of every global norm seen so far, the current
    one included.

    The history is kept as a histogram of `\log_2 g` with ``bins_per_octave`` bins per power of two
    over `[2^{\text{min\_exponent}}, 2^{\text{max\_exponent}})` (norms outside fall into the end bins):
    memory is fixed, ``(max_exponent - min_exponent) * bins_per_octave`` int64 counts (32 KiB by default),
    however long the run. The threshold is the upper edge of the bin that holds the nearest-rank percentile
    `x_{(k)}`, `k = \lceil q n / 100 \rceil` of the `n` norms seen: never below it and
    less than `2^{1/\text{bins\_per\_octave}}` times it (2.2% above at most by default). The paper uses
    NumPy's interpolated percentile `P` of the full history, which lies between the order statistics
    `x_{(j+1)}` and `x_{(j+2)}`, `j = \lfloor (n-1) q / 100 \rfloor`; `k` is one of `j+1, j+2`, so
    `x_{(j+1)} / x_{(j+2)} \le T / P < 2^{1/\text{bins\_per\_octave}} x_{(j+2)} / x_{(j+1)}`: as far from
    NumPy's value as those two neighbouring norms are apart, which on short histories can be tens of percent
    (docs/clipper.md gives measurements).
    """

    percentile: float = 10.0
    bins_per_octave: int = 32
    min_exponent: int = -64
    max_exponent: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.percentile <= 100, "AutoClip", "percentile", self.percentile, "in (0, 100]")
        require(self.bins_per_octave >= 1, "AutoClip", "bins_per_octave", self.bins_per_octave, "an integer >= 1")
        require(self.max_exponent > self.min_exponent, "AutoClip", "max_exponent", self.max_exponent,
                f"greater than min_exponent={self.min_exponent!r}")

    @property
    def bins(self) -> int:
        return (self.max_exponent - self.min_exponent) * self.bins_per_octave

    def _initial_state(self, device: torch.device) -> dict[str, Tensor]:
        return {"counts": torch.zeros(self.bins, dtype=torch.int64, device=device)}

    def _decide(self, norm: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        counts = state["counts"]
        finite = torch.isfinite(norm)
        position = (torch.log2(torch.where(finite, norm, 1.0)) - self.min_exponent) * self.bins_per_octave
        index = torch.clamp(torch.floor(position), 0, self.bins - 1).to(torch.int64)  # log2(0) = -inf: bin 0
        bins = torch.arange(self.bins, device=counts.device)
        counts = counts + ((bins == index) & finite).to(torch.int64)
        seen = counts.sum()
        rank = torch.clamp(torch.ceil(seen.to(torch.float64) * (self.percentile / 100.0)), min=1).to(torch.int64)
        holding = (counts.cumsum(0) < rank).sum()  # the first bin whose cumulative count reaches the rank
        edge = torch.exp2(self.min_exponent + (holding + 1).to(torch.float64) / self.bins_per_octave)
        return torch.where(seen > 0, edge, math.inf), {"counts": counts}


@dataclass(eq=False)
class ZClip(Policy):
    r"""ZClip (Kumar et al., 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"): clip a norm whose
    z-score against exponential moving statistics passes ``z_threshold``.

    Warm-up: the first ``warmup_steps`` finite norms are recorded and not clipped (threshold ``inf``; the
    clipper's ``max_norm`` still applies); then `\mu` and `\sigma^2` start as their mean and
    (population) variance. After it, with `z_t = (g_t - \mu) / (\sigma + \text{eps})`:

    - threshold `\tau_t = \mu + z_{thr}^2 \sigma / z_t` if `z_t > z_{thr}` (the paper's
      reciprocal "adaptive scaling": the further the spike, the harder the clip), else ``inf``;
    - the statistics follow the clipped norm `x_t = \min(g_t, \tau_t)`:
      `\mu \leftarrow \alpha\mu + (1-\alpha)x_t`, then
      `\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(x_t - \mu)^2` with the updated `\mu`.

    State: the warm-up buffer (``warmup_steps`` float64), the count of finite norms, `\mu`,
    `\sigma^2`.
    """

    alpha: float = 0.97
    z_threshold: float = 2.5
    warmup_steps: int = 25
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.alpha < 1, "ZClip", "alpha", self.alpha, "in [0, 1) (the EMA's decay)")
        require(self.z_threshold > 0, "ZClip", "z_threshold", self.z_threshold, "a positive number")
        require(self.warmup_steps >= 1, "ZClip", "warmup_steps", self.warmup_steps, "an integer >= 1")
        require(self.eps >= 0, "ZClip", "eps", self.eps, "a non-negative number")

    def _initial_state(self, device: torch.device) -> dict[str, Tensor]:
        return {
            "warmup": torch.zeros(self.warmup_steps, dtype=torch.float64, device=device),
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "mean": torch.zeros((), dtype=torch.float64, device=device),
            "var": torch.zeros((), dtype=torch.float64, device=device),
        }

    def _decide(self, norm: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        warmup, count, mean, var = state["warmup"], state["count"], state["mean"], state["var"]
        finite = torch.isfinite(norm)
        warming = count < self.warmup_steps
        record = warming & finite
        slots = torch.arange(self.warmup_steps, device=warmup.device)
        warmup = torch.where(record & (slots == count), norm, warmup)
        new_count = count + record.to(torch.int64)
        done = record & (new_count == self.warmup_steps)  # the warm-up ends with this norm
        start_mean = warmup.mean()
        start_var = (warmup - start_mean).square().mean()

        active = ~warming & finite
        std = var.sqrt()
        z = (norm - mean) / (std + self.eps)
        spike = active & (z > self.z_threshold)
        threshold = torch.where(spike, mean + self.z_threshold**2 * std / z, math.inf)
        x = torch.minimum(norm, threshold)
        ema_mean = self.alpha * mean + (1 - self.alpha) * x
        ema_var = self.alpha * var + (1 - self.alpha) * (x - ema_mean).square()

        mean = torch.where(done, start_mean, torch.where(active, ema_mean, mean))
        var = torch.where(done, start_var, torch.where(active, ema_var, var))
        return threshold, {"warmup": warmup, "count": new_count, "mean": mean, "var": var}


@dataclass(eq=False)
class SpikeSkip(Policy):
    r"""Skip the step when the norm is an outlier against a window of recent norms.

    With `m` and `s` the mean and sample standard deviation of the last ``window`` norms of steps
    that were not skipped by this policy, the step is skipped on every rank when
    `g_t > m + \text{sigma} \cdot s`, once at least ``min_history`` norms are in the window (before
    that the threshold is ``inf``). A skipped norm stays out of the window, so one spike does not widen it.
    State: the ring buffer (``window`` float64) and the count of recorded norms.
    """

    action: ClassVar[str] = "skip"

    window: int = 128
    sigma: float = 6.0
    min_history: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.min_history >= 2, "SpikeSkip", "min_history", self.min_history,
                "an integer >= 2 (a standard deviation needs two norms)")
        require(self.min_history <= self.window, "SpikeSkip", "min_history", self.min_history,
                f"at most window={self.window!r}")
        require(self.sigma >= 0, "SpikeSkip", "sigma", self.sigma, "a non-negative number")

    def _initial_state(self, device: torch.device) -> dict[str, Tensor]:
        return {
            "values": torch.zeros(self.window, dtype=torch.float64, device=device),
            "count": torch.zeros((), dtype=torch.int64, device=device),
        }

    def _decide(self, norm: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        values, count = state["values"], state["count"]
        slots = torch.arange(self.window, device=values.device)
        held = torch.clamp(count, max=self.window)
        valid = slots < held
        n = held.to(torch.float64)
        mean = torch.where(valid, values, 0.0).sum() / torch.clamp(n, min=1)
        var = torch.where(valid, (values - mean).square(), 0.0).sum() / torch.clamp(n - 1, min=1)
        threshold = torch.where(held >= self.min_history, mean + self.sigma * var.sqrt(), math.inf)
        record = torch.isfinite(norm) & (norm <= threshold)
        values = torch.where(record & (slots == count % self.window), norm, values)
        return threshold, {"values": values, "count": count + record.to(torch.int64)}


@dataclass(frozen=True)
class Decision:
    """The policies' verdict on one step: the clip threshold (the clipper's ``max_norm`` and every clip
    policy's, the smallest) and the skip threshold (every skip policy's, the smallest; ``inf`` if none)."""

    clip_threshold: Tensor
    skip_threshold: Tensor


def decide(policies: list[Policy], norm: Tensor, max_norm: float) -> Decision:
    """Every policy's threshold for ``norm``, combined (see `Decision`). No host synchronisation."""
    clip = torch.full((), max_norm, dtype=torch.float64, device=norm.device)
    skip = torch.full((), math.inf, dtype=torch.float64, device=norm.device)
    for policy in policies:
        threshold = policy.decide(norm)
        if policy.action == "skip":
            skip = torch.minimum(skip, threshold)
        else:
            clip = torch.minimum(clip, threshold)
    return Decision(clip, skip)
