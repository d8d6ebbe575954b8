"""Seeded, global-RNG-free index bookkeeping: subsets, epoch orders and distributed shards.

Everything here is a pure function of its arguments so that resuming a run, or running it on a
different number of ranks, reproduces exactly the same examples and augmentations.
"""

from __future__ import annotations

import numpy as np
import torch

# Independent random streams derived from the same (seed, epoch).
STREAM_SHUFFLE = 0
STREAM_AUGMENT = 1
STREAM_SUBSET = 2

_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """Hash integers into one well-mixed 63-bit seed (nearby seeds give unrelated streams)."""
    entropy = [int(p) % (1 << 64) for p in parts]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return int(state[0]) & _MASK63


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """CPU generator for one (seed, epoch, stream); CPU so results do not depend on the device."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mix_seed(seed, epoch, stream))
    return gen


def _balanced_quotas(counts: list[int], n: int, gen: torch.Generator) -> list[int]:
    """Split n over classes as evenly as their sizes allow; leftovers go to random classes."""
    quotas = [0] * len(counts)
    remaining = n
    open_classes = [c for c, count in enumerate(counts) if count > 0]
    while remaining > 0 and open_classes:
        share = remaining // len(open_classes)
        if share == 0:
            chosen = torch.randperm(len(open_classes), generator=gen)[:remaining]
            for pos in chosen.tolist():
                quotas[open_classes[pos]] += 1
            break
        for c in open_classes:
            add = min(share, counts[c] - quotas[c])
            quotas[c] += add
            remaining -= add
        open_classes = [c for c in open_classes if quotas[c] < counts[c]]
    return quotas


def balanced_subset_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Seeded class-balanced subset of positions, sorted ascending.

    Balanced rather than "the first n" because data files are often sorted by class. Classes with
    too few examples contribute all of them and the rest is spread over the others.
    """
    labels = torch.as_tensor(labels).detach().to("cpu", torch.int64).flatten()
    total = labels.numel()
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    if n >= total:
        return torch.arange(total)
    gen = epoch_generator(seed, 0, STREAM_SUBSET)
    order = torch.argsort(labels, stable=True)  # positions grouped by class, ascending inside
    _, counts = torch.unique(labels, return_counts=True)
    quotas = _balanced_quotas(counts.tolist(), n, gen)
    picks = []
    start = 0
    for count, quota in zip(counts.tolist(), quotas, strict=True):
        members = order[start : start + count]
        start += count
        if quota:
            picks.append(members[torch.randperm(count, generator=gen)[:quota]])
    return torch.sort(torch.cat(picks)).values


def shard_size(n: int, world_size: int, drop_last: bool) -> int:
    """Examples per rank: equal on all ranks (tail dropped, or padded by wrapping around)."""
    return n // world_size if drop_last else -(-n // world_size)


def epoch_positions(
    n: int,
    epoch: int,
    *,
    seed: int,
    shuffle: bool,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> torch.Tensor:
    """This rank's dataset positions for one epoch, in the order they are visited.

    All ranks compute the same permutation from (seed, epoch) and take a strided slice of it,
    like torch's DistributedSampler, so shards are disjoint (apart from wrap-around padding).
    """
    if shuffle:
        order = torch.randperm(n, generator=epoch_generator(seed, epoch, STREAM_SHUFFLE))
    else:
        order = torch.arange(n)
    if world_size == 1:
        return order
    per_rank = shard_size(n, world_size, drop_last)
    total = per_rank * world_size
    if total > n:
        repeats = -(-total // n)
        order = order.repeat(repeats)
    return order[:total][rank::world_size]
