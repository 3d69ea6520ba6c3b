"""The ``distclip`` command line (``python -m distclip``). One subcommand for now: ``demo``."""

import argparse
import sys
from collections.abc import Sequence

from distclip import _demo


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand and return its exit status."""
    args = _parser().parse_args(_attach_norm_type(sys.argv[1:] if argv is None else list(argv)))
    return _demo.run(
        _demo.Config(
            nproc=args.nproc,
            steps=args.steps,
            max_norm=args.max_norm,
            norm_type=args.norm_type,
            backend=args.backend,
            seed=args.seed,
        )
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distclip", description="Gradient clipping for distributed PyTorch.")
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
    demo.add_argument("--max-norm", type=float, default=1.0, help="max_norm of the clip (default 1.0)")
    demo.add_argument("--norm-type", type=_norm_type, default=2.0,
                      help="p of the norm: a number, inf or -inf (default 2)")
    demo.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                      help="gloo (CPU, default) or nccl (one GPU per rank, cuda:LOCAL_RANK)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default 0)")
    return parser


def _attach_norm_type(argv: list[str]) -> list[str]:
    """``--norm-type -inf`` as ``--norm-type=-inf``: argparse would take ``-inf`` for an option."""
    attached: list[str] = []
    for arg in argv:
        if attached and attached[-1] == "--norm-type" and arg.startswith("-"):
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


def _norm_type(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, inf or -inf, got {text!r}") from None
