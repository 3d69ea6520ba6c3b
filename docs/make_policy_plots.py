"""Draw docs/img/policies.png: each GradClipper policy's threshold against the norm over a synthetic run.

    python docs/make_policy_plots.py

The run is a gradient whose norm decays from about 3 to 1 with log-normal noise and three spikes (steps 120,
121 and 230). Each panel clips it with distclip.GradClipper itself and plots what the reports say. matplotlib
is needed for this script only.
"""

import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import distclip  # noqa: E402

STEPS = 300
SPIKES = {120: 8.0, 121: 5.0, 230: 10.0}
OUT = pathlib.Path(__file__).parent / "img" / "policies.png"


def synthetic_norms() -> list[float]:
    gen = torch.Generator().manual_seed(0)
    noise = torch.exp(0.15 * torch.randn(STEPS, generator=gen, dtype=torch.float64))
    trend = [1.0 + 2.0 * math.exp(-t / 60) for t in range(STEPS)]
    return [trend[t] * float(noise[t]) * SPIKES.get(t, 1.0) for t in range(STEPS)]


def run(max_norm: float, policy, weight_growth: float = 0.0) -> dict[str, list[float]]:
    """Clip the synthetic run with one 64-element parameter; return what the reports say, step by step."""
    direction = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    direction /= direction.norm()
    param = torch.nn.Parameter(direction.clone() * 50.0)
    clipper = distclip.GradClipper([param], max_norm, policy=policy)
    out: dict[str, list[float]] = {"norm": [], "threshold": [], "skip_threshold": [], "post": [], "skipped": [],
                                   "trigger": []}
    for t, norm in enumerate(synthetic_norms()):
        with torch.no_grad():
            param.mul_(1.0 + weight_growth)
        param.grad = direction * norm
        if isinstance(policy, distclip.ZClip):  # the norm above which ZClip fires: mean + z_threshold * std
            state = policy.state_dict()
            warm = int(state["count"]) >= policy.warmup_steps
            out["trigger"].append(float(state["mean"] + policy.z_threshold * state["var"].sqrt()) if warm else math.nan)
        report = clipper.clip_()
        out["norm"].append(float(report.norm))
        out["threshold"].append(float(report.threshold))
        out["skip_threshold"].append(float(report.skip_threshold))
        out["post"].append(math.nan if report.skipped else float(report.post_norm))
        out["skipped"].append(float(report.skip))
    return out


def main() -> None:
    panels = [
        ("fixed max_norm = 2.0", run(2.0, None), "threshold"),
        ("AutoClip(percentile=10)", run(math.inf, distclip.AutoClip(percentile=10)), "threshold"),
        ("ZClip(alpha=0.97, z_threshold=2.5, warmup_steps=25)", run(math.inf, distclip.ZClip()), "threshold"),
        ("SpikeSkip(window=128, sigma=6, min_history=16)", run(math.inf, distclip.SpikeSkip()), "skip_threshold"),
        ("AGC(clipping=0.04), one 1-D unit, weight norm growing from 50", run(math.inf, distclip.AGC(0.04), 2e-3),
         None),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 2.6 * len(panels)), sharex=True)
    steps = range(STEPS)
    for ax, (title, r, threshold) in zip(axes, panels):
        ax.plot(steps, r["norm"], color="0.6", lw=1, label="norm before clipping")
        ax.plot(steps, r["post"], color="tab:blue", lw=1, label="norm after clipping")
        if threshold == "skip_threshold":
            ax.plot(steps, r["skip_threshold"], color="tab:red", lw=1.2, label="skip threshold")
            skipped = [t for t in steps if r["skipped"][t]]
            ax.scatter(skipped, [r["norm"][t] for t in skipped], color="tab:red", marker="x", zorder=3,
                       label="skipped step (gradients kept, no update)")
        elif r["trigger"]:
            ax.plot(steps, r["trigger"], color="tab:red", lw=1, ls="--", label="μ + z_threshold·σ (fires above)")
            fired = [t for t in steps if math.isfinite(r["threshold"][t])]
            ax.scatter(fired, [r["threshold"][t] for t in fired], color="tab:orange", zorder=3,
                       label="clip threshold μ + z_thr²·σ/z")
        elif threshold:
            ax.plot(steps, r["threshold"], color="tab:orange", lw=1.2, label="clip threshold")
        else:
            bound = [0.04 * 50.0 * (1 + 2e-3) ** (t + 1) for t in steps]
            ax.plot(steps, bound, color="tab:orange", lw=1.2, label="λ·‖W‖ (unit threshold)")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    OUT.parent.mkdir(exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
