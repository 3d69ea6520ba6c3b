"""distclip's example: a small transformer language model on synthetic tokens, clipped by distclip.

Start it with a launcher (every wrapper in this folder runs it; see launch/README.md), for example::

    torchrun --standalone --nproc-per-node 2 launch/train_lm.py --layout fsdp2

``--layout`` picks how the model is distributed, and with it the one line that clips:

- ``ddp``: ``DistributedDataParallel``; ``distclip.clip_module_grad_norm_(model, max_norm)`` (gradients are
  replicated: no collective, each rank computes the same norm).
- ``fsdp1``: ``FullyShardedDataParallel``, one unit per block; ``distclip.clip_module_grad_norm_`` (one
  all_reduce over the flat shards).
- ``fsdp2``: ``fully_shard`` on every block and on the root; ``distclip.clip_module_grad_norm_`` (one
  all_reduce over the DTensor shards).
- ``deepspeed``: a ZeRO engine (``--zero-stage``, default 2) with ``distclip.integrations.deepspeed.attach``;
  every ``engine.step()`` clips through distclip. Also runs under the DeepSpeed launcher
  (``launch/deepspeed/run.sh launch/train_lm.py --layout deepspeed``).

Each step prints the loss (averaged over the ranks) and the pre-clip global gradient norm, which is the same
on every rank. On GPUs every rank uses ``cuda:LOCAL_RANK`` and nccl; without CUDA the CPU and gloo.
The model, its initial weights and every rank's batches depend only on ``--seed`` and the rank, so the first
step's norm is the same whatever the layout.
"""

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

import distclip
from distclip.shutdown import exit_cleanly

LAYOUTS = ("ddp", "fsdp1", "fsdp2", "deepspeed")
# A collective that does not finish in this time fails the job (with the ranks' error) instead of hanging it.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention and an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, dim // self.heads).unbind(2)
        attention = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x))


class LanguageModel(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final norm and an (untied) output head."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, length: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tokens(tokens) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def synthetic_batch(generator: torch.Generator, successor: Tensor, batch: int, length: int) -> Tensor:
    """``batch`` sequences of ``length + 1`` tokens: a random first token, then each token's fixed successor
    (a random permutation of the vocabulary), so the loss falls as the model learns it."""
    tokens = torch.empty(batch, length + 1, dtype=torch.int64)
    tokens[:, 0] = torch.randint(len(successor), (batch,), generator=generator)
    for t in range(length):
        tokens[:, t + 1] = successor[tokens[:, t]]
    return tokens


def build(args: argparse.Namespace) -> tuple[LanguageModel, Tensor]:
    """The model with its initial weights and the token successors: the same on every rank and in every layout."""
    torch.manual_seed(args.seed)
    model = LanguageModel(args.vocab, args.dim, args.heads, args.layers, args.length)
    return model, torch.randperm(args.vocab)


def rank_generator(args: argparse.Namespace, rank: int) -> torch.Generator:
    """The generator of ``rank``'s batches: each rank its own, whatever the layout."""
    return torch.Generator().manual_seed(args.seed * 1_000_003 + rank)


def main() -> int:
    args = parse_args()
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if args.layout == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    model, successor = build(args)
    parameters = sum(p.numel() for p in model.parameters())
    data = rank_generator(args, rank)

    def say(line: str) -> None:
        if rank == 0 or args.all_ranks:  # one write per line, so that the ranks' lines never interleave
            sys.stdout.write(line + (f"  (rank {rank})" if args.all_ranks else "") + "\n")
            sys.stdout.flush()

    say(f"train_lm: layout {args.layout}, {world_size} ranks, {backend} on {device.type}, "
        f"{parameters:,} parameters, max_norm {args.max_norm}")
    step_fn = _trainer(args, model, device)
    for step in range(1, args.steps + 1):
        tokens = synthetic_batch(data, successor, args.batch, args.length).to(device)
        loss, norm = step_fn(tokens[:, :-1], tokens[:, 1:])
        mean_loss = loss.detach().float().reshape(1)
        dist.all_reduce(mean_loss)  # for the printout only: the loss averaged over the ranks
        clipped = "  clipped" if args.max_norm / (norm + 1e-6) < 1 else ""  # the coefficient distclip applied
        say(f"step {step}/{args.steps}  loss {mean_loss.item() / world_size:.4f}  norm {norm!r}{clipped}")
    say(f"train_lm: {args.steps} steps done")
    dist.destroy_process_group()
    return 0


def _trainer(args: argparse.Namespace, model: nn.Module, device: torch.device):
    """The layout's training step, ``step(inputs, targets) -> (loss, pre-clip norm as a float)``."""
    if args.layout == "deepspeed":
        return _deepspeed_trainer(args, model)
    model = _wrap(args.layout, model.to(device), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def step(inputs: Tensor, targets: Tensor) -> tuple[Tensor, float]:
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        norm = distclip.clip_module_grad_norm_(model, args.max_norm)  # the global norm, in every layout
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, float(norm)

    return step


def _wrap(layout: str, model: LanguageModel, device: torch.device) -> nn.Module:
    if layout == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if layout == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=device,
                                        use_orig_params=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _deepspeed_trainer(args: argparse.Namespace, model: nn.Module):
    import deepspeed

    from distclip.integrations.deepspeed import attach

    config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": args.max_norm,  # what DeepSpeed clips by again if the handle is detached
        "zero_optimization": {"stage": args.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    handle = attach(engine, args.max_norm)  # from here on, engine.step() clips through distclip

    def step(inputs: Tensor, targets: Tensor) -> tuple[Tensor, float]:
        logits = engine(inputs.to(engine.device))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.to(engine.device).flatten())
        engine.backward(loss)
        engine.step()
        return loss, float(handle.last_norm)

    return step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=LAYOUTS, default="ddp", help="how the model is distributed (default ddp)")
    parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    parser.add_argument("--max-norm", type=float, default=0.5, help="max_norm of the clip (default 0.5)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step (default 8)")
    parser.add_argument("--length", type=int, default=32, help="tokens per sequence (default 32)")
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size (default 256)")
    parser.add_argument("--dim", type=int, default=64, help="model width (default 64)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2,
                        help="ZeRO stage with --layout deepspeed (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    parser.add_argument("--all-ranks", action="store_true", help="every rank prints its lines, not only rank 0")
    parser.add_argument("--local_rank", "--local-rank", type=int, help="set by the DeepSpeed launcher; unused")
    args = parser.parse_args(argv)
    if args.dim % args.heads:
        parser.error(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    if not (args.steps > 0 and args.max_norm >= 0):
        parser.error("--steps must be positive and --max-norm non-negative")
    return args


if __name__ == "__main__":
    # Leave without Python's shutdown, where torch 2.13's gloo threads can abort a finished rank (see
    # distclip.shutdown): the process group destroyed, the output flushed, then os._exit with the status.
    exit_cleanly(main())
