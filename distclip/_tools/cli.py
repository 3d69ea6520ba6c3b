"""The ``distclip`` command line (``python -m distclip``): its arguments, and ``demo`` and ``bench``, each
imported when its subcommand runs."""

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

import distclip
from distclip._clip import arguments

if TYPE_CHECKING:
    from distclip._tools import bench


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand and return its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(_attach_negative_values(argv))
    if args.command == "bench":
        return _run_bench(args, argv)
    return _run_demo(args)


def _run_demo(args: argparse.Namespace) -> int:
    from distclip._tools import demo

    return demo.run(
        demo.Config(
            nproc=args.nproc,
            steps=args.steps,
            max_norm=args.max_norm,
            norm_type=args.norm_type,
            backend=args.backend,
            seed=args.seed,
        )
    )


def _run_bench(args: argparse.Namespace, argv: list[str]) -> int:
    from distclip._tools import bench

    return bench.run(_bench_config(args), " ".join(["distclip", *argv]))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distclip", description="Gradient clipping for distributed PyTorch.")
    parser.add_argument("--version", action="version",
                        version=f"distclip {distclip.__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="clip sharded gradients over real processes and check every norm",
        description=(
            "Train a small MLP on N ranks with ZeRO-style uneven gradient shards, clip them with "
            "distclip.clip_grad_norm_(..., group=WORLD) and check each step against the float64 norm of the "
            "unsharded gradient. Starts the ranks itself on 127.0.0.1, or runs as one rank under torchrun. "
            "Exit status 0 if every step is OK."
        ),
    )
    demo.add_argument("--nproc", type=_positive_int, default=2,
                      help="number of ranks to start (default 2; unused under torchrun, which starts them)")
    demo.add_argument("--steps", type=_positive_int, default=5, help="training steps (default 5)")
    demo.add_argument("--max-norm", type=_max_norm, default=1.0,
                      help="max_norm of the clip: a non-negative number, inf never clips (default 1.0)")
    demo.add_argument("--norm-type", type=_norm_type, default=2.0,
                      help="p of the norm: a number > 0, inf or -inf (default 2)")
    demo.add_argument("--backend", type=_backend, choices=("gloo", "nccl"), default="gloo",
                      help="gloo (CPU, default) or nccl (one GPU per rank, cuda:LOCAL_RANK)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default 0)")
    _add_bench(commands)
    return parser


def _add_bench(commands) -> None:
    # Its help lists the bench's workloads and layouts.
    from distclip._tools.bench.workloads import LAYOUTS, WORKLOADS

    bench = commands.add_parser(
        "bench",
        help="time clipping against torch, FSDP1 and the memory-bandwidth floor",
        description=(
            "Time distclip's clip against torch's foreach clip (one process), and with --nproc N >= 2 its sharded "
            "clip against a hand-written one and FSDP1's on N gloo ranks, all against the memory-bandwidth floor "
            "measured in the same run (read once for the norm, read and write once to scale). Variants are "
            "interleaved; medians and minimums, peak extra memory, the targets with PASS/FAIL, a JSON file and "
            "a plot. Reading guide: docs/benchmarks.md. Exit status 0 if the run completed."
        ),
    )
    bench.add_argument("--nproc", type=_non_negative_int, default=2,
                       help="gloo ranks for the sharded variants (default 2; 0 or 1: single process only)")
    bench.add_argument("--workloads", default=",".join(WORKLOADS),
                       help=f"comma list of {', '.join(WORKLOADS)} (default all)")
    bench.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (default both)")
    bench.add_argument("--norm-types", default="2,inf", help="comma list of p: numbers > 0 or inf (default 2,inf)")
    bench.add_argument("--repeats", type=_positive_int, default=None,
                       help="timed samples per variant (default 5, 2 with --quick); a sample repeats a cheap call "
                            "until it lasts 20 ms")
    bench.add_argument("--json", default="bench.json", metavar="PATH",
                       help="where to write every measurement (default bench.json; '' for none)")
    bench.add_argument("--plot", default="bench.png", metavar="PATH",
                       help="where to write the plot, if matplotlib is installed (default bench.png; '' for none)")
    bench.add_argument("--fsdp1-dtypes", default="bf16",
                       help="dtypes on which FSDP1's clip is measured too (default bf16; '' for none)")
    bench.add_argument("--layouts", "--layout", default=",".join(LAYOUTS),
                       help=f"comma list of the sharded runs' gradient layouts: {', '.join(LAYOUTS)} "
                            "(default all; see docs/benchmarks.md)")
    bench.add_argument("--quick", action="store_true", help="small sizes and few samples: a smoke run")
    bench.add_argument("--seed", type=int, default=0, help="seed of the gradients (default 0)")


def _bench_config(args: argparse.Namespace) -> "bench.Config":
    from distclip._tools import bench

    def listed(text: str, allowed, what: str, empty_ok: bool = False) -> tuple[str, ...]:
        if empty_ok and not text.strip():
            return ()
        try:
            return bench.parse_list(text, allowed, what)
        except ValueError as err:
            _parser().error(str(err))

    return bench.Config(
        nproc=args.nproc,
        workloads=listed(args.workloads, bench.WORKLOADS, "--workloads"),
        dtypes=listed(args.dtypes, tuple(bench.DTYPES), "--dtypes"),
        norm_types=listed(args.norm_types, None, "--norm-types"),
        repeats=args.repeats or (2 if args.quick else 5),
        json_path=args.json or None,
        plot_path=args.plot or None,
        quick=args.quick,
        fsdp1_dtypes=listed(args.fsdp1_dtypes, tuple(bench.DTYPES), "--fsdp1-dtypes", empty_ok=True),
        seed=args.seed,
        layouts=listed(args.layouts, bench.LAYOUTS, "--layouts"),
    )


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--norm-type -inf`` as ``--norm-type=-inf`` (and ``--max-norm``): argparse would take ``-inf`` for an
    option, and then report a missing value instead of checking it."""
    attached: list[str] = []
    for arg in argv:
        if attached and attached[-1] in ("--norm-type", "--max-norm") and arg.startswith("-"):
            attached[-1] += "=" + arg
        else:
            attached.append(arg)
    return attached


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


# The demo clips sharded gradients (group=WORLD), so its flags take the values the sharded clip takes, checked
# by the library's own rules here, before any rank starts, and reported in the command line's terms.
def _norm_type(text: str) -> float:
    try:
        return arguments.norm_order(_number(text, "a number > 0, inf or -inf"), sharded=True)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number > 0, inf or -inf, got {text!r}: the demo clips sharded gradients, for which "
            "p = 0, a negative p and nan have no meaning"
        ) from None


def _max_norm(text: str) -> float:
    try:
        return arguments.max_norm_value(_number(text, "a non-negative number or inf"), sharded=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative number (inf: never clip), got {text!r}") from None


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _backend(text: str) -> str:
    """The backend, refused before any rank starts where it cannot run: nccl without CUDA."""
    if text == "nccl" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            "nccl needs CUDA GPUs, one per rank, and torch sees none (torch.cuda.is_available() is False); "
            "on CPUs use --backend gloo"
        )
    return text


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value
