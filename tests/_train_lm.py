"""What the example ``launch/train_lm.py`` prints, checked against a float64 reference computed here.

Every launch of it (``tests/tools/test_launch.py``, the quickstart in ``tests/test_docs.py``, the compose job in
``tests/tools/test_docker_recipe.py``) must print every step on every rank, with a finite loss and the same norm
bits on every rank, and its first step must match the reference: the first norm is the norm of the gradient
averaged over the ranks, whatever the layout and the launcher.
"""

import functools
import importlib.util
import math
import re
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
WORLD = 2
# The first step's norm against the float64 reference: float32 gradients, reduced in different orders.
REL = 1e-5
STEP_LINE = re.compile(r"^step (\d+)/(\d+)  loss (\S+)  norm (\S+)(?:  clipped)?(?:  \(rank (\d+)\))?$", re.MULTILINE)


def _example():
    spec = importlib.util.spec_from_file_location("train_lm", REPO / "launch" / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def reference(world: int = WORLD) -> tuple[float, float]:
    """The first step's (loss, norm) in float64 on this process, for a world of ``world`` ranks: the default
    model and each rank's first batch as train_lm.py draws them; the loss is the mean of the ranks' losses, the
    gradient the mean of theirs (as DDP, FSDP and DeepSpeed average)."""
    example = _example()
    args = example.parse_args([])
    model, successor = example.build(args)
    model = model.double()
    losses = []
    for rank in range(world):
        tokens = example.synthetic_batch(example.rank_generator(args, rank), successor, args.batch, args.length)
        logits = model(tokens[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
    loss = torch.stack(losses).mean()
    loss.backward()
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return loss.item(), norm.item()


def check_steps(stdout: str, context: str, world: int = WORLD, steps: int = STEPS, all_ranks: bool = True) -> None:
    """Every rank (``all_ranks``; else rank 0, which prints without a rank) printed steps 1..steps with a finite
    loss, all ranks the same norm bits at each step, and the first step matches :func:`reference`."""
    by_rank: dict[int, list[tuple[int, float, str]]] = {}
    for step, total, loss, norm, rank in STEP_LINE.findall(stdout):
        assert int(total) == steps, context
        by_rank.setdefault(int(rank or 0), []).append((int(step), float(loss), norm))
    assert sorted(by_rank) == list(range(world if all_ranks else 1)), context
    for rank_lines in by_rank.values():
        assert [step for step, _, _ in rank_lines] == list(range(1, steps + 1)), context
        assert all(math.isfinite(loss) for _, loss, _ in rank_lines), context
    for step in range(steps):
        norms = {rank_lines[step][2] for rank_lines in by_rank.values()}
        assert len(norms) == 1, f"step {step + 1}: the ranks printed different norms {norms}\n{context}"
    (_, loss, norm), *_ = by_rank[0]
    expected_loss, expected_norm = reference(world)
    assert math.isfinite(float(norm)) and float(norm) > 0, context
    assert math.isclose(loss, expected_loss, rel_tol=1e-3), f"loss {loss} != {expected_loss}\n{context}"
    assert math.isclose(float(norm), expected_norm, rel_tol=REL), f"norm {norm} != {expected_norm}\n{context}"
