"""Evaluation split across the processes of a ``torchrun`` job, with one-process results.

Sampling and feature extraction are the expensive parts of FID/KID; they split over processes
as follows, so the metrics equal those of one process running everything:

1. :func:`shard_range` gives each process a contiguous block of the sample indices
   ``0 .. N-1`` (block sizes differ by at most one).
2. :func:`sample_noise` draws the starting noise of sample ``i`` from a generator seeded by
   ``(seed, i)`` alone, so a sample's noise does not depend on the number of processes, the
   block it falls in or the batch size.
3. Each process samples and extracts features of its block; :func:`gather_rows` concatenates
   the blocks of all processes in rank order (the blocks may differ in size), which restores
   the order ``0 .. N-1``.
4. The metrics are computed from the gathered features by :func:`kdiff.eval.compute_metrics`,
   which runs no collective, so one process may compute them while the others go on.

Without a process group every function behaves as for a single process.

Example:
    >>> import torch
    >>> from kdiff.eval import gather_rows, sample_noise, shard_range
    >>> block = shard_range(10)                       # one process: all ten samples
    >>> noise = sample_noise(0, block, (3, 4, 4))
    >>> torch.equal(noise[3], sample_noise(0, [3], (3, 4, 4))[0])  # sample 3, whatever the block
    True
    >>> gather_rows(noise).shape
    torch.Size([10, 3, 4, 4])
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from kdiff import distributed as _dist

__all__ = ["gather_rows", "sample_noise", "shard_range"]

_MASK64 = (1 << 64) - 1


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


def shard_range(num_samples: int, *, rank: int | None = None, world_size: int | None = None) -> range:
    """This process's contiguous block of ``range(num_samples)``.

    Blocks are in rank order and their sizes differ by at most one (the first
    ``num_samples % world_size`` ranks take one more); a block may be empty when there are
    fewer samples than processes.

    Args:
        num_samples: Total number of samples ``N`` (``>= 0``).
        rank: This process's rank (default: from the process group, 0 without one).
        world_size: Number of processes (default: from the process group, 1 without one).

    Returns:
        A ``range`` of global sample indices.

    Raises:
        ValueError: Negative counts, ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.

    Example:
        >>> [shard_range(10, rank=r, world_size=3) for r in range(3)]
        [range(0, 4), range(4, 7), range(7, 10)]
    """
    _check_int(num_samples, "num_samples", 0)
    world = _dist.world_size() if world_size is None else _check_int(world_size, "world_size", 1)
    rank = _dist.rank() if rank is None else _check_int(rank, "rank", 0)
    if rank >= world:
        raise ValueError(f"rank must be in [0, world_size={world}); got {rank}")
    base, extra = divmod(num_samples, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed from ``(seed, index)`` (splitmix64 finaliser), stable across platforms."""
    h = (seed * 0x9E3779B97F4A7C15 + index + 0x632BE59BD9B4E019) & _MASK64
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (h ^ (h >> 31)) >> 1


def sample_noise(
    seed: int,
    indices: Sequence[int] | range,
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise for the samples ``indices``, one seeded generator per sample.

    Row ``j`` is drawn (on the CPU) from a generator seeded by ``(seed, indices[j])`` only, so
    the noise of sample ``i`` is the same whichever process, block or batch draws it.

    Args:
        seed: Seed of the whole sample set (an int ``>= 0``).
        indices: Global indices of the samples (ints ``>= 0``), e.g. a :func:`shard_range`.
        shape: Shape of one sample's noise, e.g. ``(3, 32, 32)``.
        dtype: Floating dtype of the result.

    Returns:
        ``[len(indices), *shape]`` CPU tensor.

    Raises:
        ValueError: A negative or non-int seed or index, or a negative dimension in ``shape``.

    Example:
        >>> a = sample_noise(7, range(0, 4), (2,))
        >>> b = sample_noise(7, range(2, 6), (2,))
        >>> torch.equal(a[2:], b[:2])
        True
    """
    _check_int(seed, "seed", 0)
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must have non-negative dimensions; got {tuple(shape)}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype; got {dtype}")
    rows = list(indices)
    for i in rows:
        _check_int(i, "indices[...]", 0)
    out = torch.empty((len(rows), *dims), dtype=dtype)
    g = torch.Generator()
    for j, i in enumerate(rows):
        g.manual_seed(_sample_seed(seed, i))
        out[j] = torch.randn(dims, generator=g, dtype=dtype)
    return out


def _all_gather_ints(values: list[int], device: torch.device, world: int) -> list[tuple[int, ...]]:
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [tuple(p.tolist()) for p in parts]


def gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate every process's rows (dim 0) in rank order; blocks may differ in size.

    Every process of the default group must call it (it is a collective) with a tensor of the
    same dtype and the same trailing shape; an empty block (``0`` rows) is allowed. The blocks
    are padded to the largest one for ``all_gather`` and trimmed afterwards. Without a process
    group the tensor is returned as it is.

    Args:
        tensor: This process's rows, ``[n_rank, *shape]``.

    Returns:
        ``[sum(n_rank), *shape]`` on ``tensor``'s device, identical on every process.

    Raises:
        ValueError: ``tensor`` is 0-d, or the trailing shapes differ between processes.

    Example:
        >>> gather_rows(torch.arange(6.0).reshape(3, 2)).shape  # one process
        torch.Size([3, 2])
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"tensor must be a torch.Tensor; got {type(tensor).__name__}")
    if tensor.ndim == 0:
        raise ValueError("tensor must have at least one dimension (the rows to gather)")
    world = _dist.world_size()
    if world == 1:
        return tensor
    # nccl only moves CUDA tensors; gloo only CPU ones.
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    # Agree on rank and dtype first, so a mismatch is an error here and not inside all_gather.
    kinds = _all_gather_ints([tensor.ndim, zlib.crc32(str(tensor.dtype).encode())], comm, world)
    if any(k != kinds[0] for k in kinds):
        raise ValueError("every process must gather rows of the same number of dimensions and dtype; "
                         f"this process has {tensor.ndim} dimensions of {tensor.dtype}")
    shapes = _all_gather_ints(list(tensor.shape), comm, world)
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise ValueError(f"every process must gather rows of the same trailing shape; got {[list(s) for s in shapes]}")
    most = max(s[0] for s in shapes)
    padded = torch.zeros((most, *tensor.shape[1:]), dtype=tensor.dtype, device=comm)
    padded[: tensor.shape[0]] = tensor.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: s[0]] for p, s in zip(parts, shapes, strict=True)]).to(tensor.device)
