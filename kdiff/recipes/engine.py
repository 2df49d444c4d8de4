"""The training engine shared by the reference loops.

What it does, so each loop only writes its loss:

* **Processes**: :func:`setup_runtime` reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
  and uses the default process group the caller created; with none and ``WORLD_SIZE > 1`` it
  creates one (gloo on CPU, nccl on CUDA) and keeps it until the process exits, so any number of
  loops run one after another in one process. The model is wrapped in DDP. Each process gets
  ``batch_size / K`` samples (:func:`per_process_batch` refuses a batch that does not divide).
* **Determinism**: the data order is a seeded permutation stream (:class:`IndexStream`) and
  every random draw of a step (flips, times, noise) comes from a generator seeded by
  ``(seed, step)`` and is drawn for the *global* batch, then sliced per process. So K processes
  see exactly the samples one process sees, and a resumed run draws exactly what an
  uninterrupted one draws.
* **Optimisation**: learning rate as a pure function of the step (warmup, then constant,
  cosine or step decay), global grad-norm clipping, EMA of the weights.
* **Hardware**: bf16 autocast where bf16 is native (CUDA, CPUs with AVX512-BF16/AMX), ``channels_last``
  on CUDA only, optional ``torch.compile``.
* **Checkpoints**: ``out_dir/checkpoints/step_XXXXXXX/`` holds ``model.safetensors`` (weights
  and metadata), ``ema.safetensors`` and ``state.pt`` (optimizer, scheduler, step, data stream,
  RNG states of every process); ``checkpoints/latest`` names the newest complete one and is
  replaced atomically *after* all its files are written, so a kill at any moment leaves the
  last good checkpoint.
* **Observability**: metrics averaged over the log interval (and over processes) appended to
  ``metrics.jsonl``; converted to floats only at log steps; tqdm on rank 0; PNG sample grids;
  optional TensorBoard.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import struct
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdiff.io import (
    CheckpointError,
    atomic_write_bytes,
    load_state_dict_strict,
    load_training_state,
    load_weights,
    save_training_state,
    save_weights,
)
from kdiff.train_step import native_bf16

from .config import TrainConfig
from .rng import capture_rng_state, restore_rng_state

__all__ = [
    "Runtime",
    "setup_runtime",
    "per_process_batch",
    "IndexStream",
    "ImageData",
    "load_image_data",
    "lr_at",
    "ModelEMA",
    "Trainer",
    "StepBatch",
    "save_image_grid",
    "latest_checkpoint",
]

StepHook = Callable[[int], None]


# ============================================================================ processes
@dataclass
class Runtime:
    """Where this process runs: rank, world size and device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and shows progress)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, tensor: Tensor) -> Tensor:
        """This process's contiguous slice of a global-batch tensor (dim 0)."""
        if self.world_size == 1:
            return tensor
        per = per_process_batch(tensor.shape[0], self.world_size)
        return tensor[self.rank * per : (self.rank + 1) * per]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _destroy_process_group() -> None:
    # At exit, ranks reach this at different times; a gloo rank whose peers have already torn
    # down their group can abort in its own teardown. Meeting first lets all end together.
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def setup_runtime(device: str = "auto") -> Runtime:
    """Device and process group of this process, from torchrun's environment variables.

    The default process group belongs to whoever created it: when the caller (a script run
    under torchrun) has initialised ``torch.distributed``, it is used as it is and never
    destroyed here. When it is not initialised and ``WORLD_SIZE > 1``, it is created (gloo on
    CPU, nccl on CUDA) and kept for the life of the process (destroyed at exit): PyTorch does
    not reliably support destroying and re-creating the default group, so several loops run in
    one process share one group.

    Args:
        device: "auto", "cpu", "cuda" or "cuda:<i>"; under torchrun, "auto"/"cuda" use
            ``cuda:<LOCAL_RANK>``.

    Example:
        >>> rt = setup_runtime("cpu")  # one process: no process group is created
        >>> (rt.rank, rt.world_size, rt.device.type)
        (0, 1, 'cpu')
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} was asked for but CUDA is not available")
        dev = torch.device(device if ":" in device else f"cuda:{local if world > 1 else 0}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        atexit.register(_destroy_process_group)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Runtime(rank=rank, local_rank=local, world_size=world, device=dev)


def per_process_batch(global_batch: int, world_size: int) -> int:
    """``global_batch / world_size``, refusing a batch that does not divide."""
    if global_batch % world_size:
        raise ValueError(
            f"batch_size={global_batch} (the global batch) must be divisible by the number of "
            f"processes ({world_size}); choose a multiple of {world_size}"
        )
    return global_batch // world_size


# ============================================================================ data
class IndexStream:
    """An endless stream of dataset indices: a fresh seeded permutation per epoch.

    Its whole state is ``(epoch, position)``, so it is saved and restored exactly.

    Args:
        size: Dataset size.
        seed: Seed of the permutations.
    """

    def __init__(self, size: int, *, seed: int) -> None:
        if size < 1:
            raise ValueError(f"the dataset is empty (size={size})")
        self.size, self.seed = size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0xDA7A))
        return torch.randperm(self.size, generator=g)

    def next(self, n: int) -> Tensor:
        """The next ``n`` indices (int64, CPU), crossing epochs as needed."""
        parts = []
        while n > 0:
            take = min(n, self.size - self.pos)
            parts.append(self._perm[self.pos : self.pos + take])
            self.pos += take
            n -= take
            if self.pos == self.size:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(parts)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size:
            raise CheckpointError(
                f"the checkpoint's data stream covers {state['size']} images but the dataset has {self.size}"
            )
        self.seed, self.epoch, self.pos = state["seed"], state["epoch"], state["pos"]
        self._perm = self._permutation(self.epoch)


@dataclass
class ImageData:
    """A split held as tensors: ``images`` uint8 [N, 3, H, W] and ``labels`` int64 [N]."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_image_data(cfg: TrainConfig, device: torch.device, *, train: bool = True) -> ImageData:
    """The training (or test) split on ``device``.

    ``dataset="cifar10"`` reads the python batches (``cfg.data_dir`` or ``$KDIFF_DATA_DIR``);
    ``"synthetic"`` makes 512 (train) or 128 (test) deterministic random images for tests.
    """
    if cfg.dataset == "synthetic":
        n = 512 if train else 128
        g = torch.Generator().manual_seed(1234 if train else 4321)
        labels = torch.randint(0, 10, (n,), generator=g)
        base = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.int64).float()
        images = torch.nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False)
        images = images.round().clamp(0, 255).to(torch.uint8)
    else:
        from kdiff.data import CIFAR10

        ds = CIFAR10(cfg.data_dir, train=train)
        images, labels = ds.tensors()
    return ImageData(images.to(device), labels.to(device))


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h >> 1


@dataclass
class StepBatch:
    """One step's data for this process.

    Attributes:
        x: Images in [-1, 1], [B/K, 3, H, W] (flipped if configured).
        y: Labels, [B/K].
        generator: The step's generator (device-side); draw global-batch tensors with
            :meth:`Trainer.draw_rand` / ``draw_randn`` / ``draw_randint`` so every process
            slices the same global draw.
    """

    x: Tensor
    y: Tensor
    generator: torch.Generator


# ============================================================================ optimisation
def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate for the update that follows ``step`` completed steps.

    Linear warmup over ``warmup_steps``, then ``constant``, ``cosine`` (to 0 at ``total``) or
    ``step`` (/10 at 50% and 75% of ``total``).
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(total - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "step":
        return cfg.lr * (0.1 ** ((step >= total * 0.5) + (step >= total * 0.75)))
    return cfg.lr


class ModelEMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    ``ema = decay * ema + (1 - decay) * param`` after every optimizer step.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.module.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - self.decay)
        for e, b in zip(self.module.buffers(), model.buffers(), strict=True):
            e.copy_(b)


# ============================================================================ images
def _png_bytes(image: Tensor) -> bytes:
    """PNG encoding of a uint8 [H, W, 3] tensor (zlib only, no imaging library)."""
    h, w, c = image.shape
    raw = b"".join(b"\x00" + bytes(image[i].contiguous().view(-1).tolist()) for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    color = {1: 0, 3: 2, 4: 6}[c]
    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def save_image_grid(path: str | os.PathLike[str], images: Tensor, *, nrow: int | None = None, pad: int = 2) -> Path:
    """Save images in [-1, 1] ([B, C, H, W], C = 1 or 3) as one PNG grid, atomically.

    Args:
        path: Destination ``.png``.
        images: Batch of images in [-1, 1].
        nrow: Images per row (default: ``ceil(sqrt(B))``).
        pad: Pixels of black padding between images.
    """
    images = images.detach().float().cpu().clamp(-1, 1)
    b, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = (
            images[i] + 1
        ) / 2
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0)
    if c == 1:
        pixels = pixels.expand(-1, -1, 3)
    path = Path(path)
    atomic_write_bytes(path, _png_bytes(pixels.contiguous()))
    return path


# ============================================================================ logging
class _MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` and optionally writes TensorBoard scalars."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                warnings.warn("tensorboard=True but the tensorboard package is not installed; "
                              "logging to metrics.jsonl only", stacklevel=3)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _LineProgress:
    """Progress for redirected output: a plain line at start, every ~10% and at the end.

    A tqdm bar rewrites its line with carriage returns, which fills a log file with thousands
    of partial lines; a file reader wants a few whole lines per stage.
    """

    def __init__(self, total: int, initial: int, desc: str, stream: Any) -> None:
        self.total, self.n, self.desc, self.stream = total, initial, desc, stream
        self.start_n, self.t0, self.postfix = initial, time.perf_counter(), ""
        self.next_report = self._next_mark(initial)
        self._print(f"{desc}: step {initial}/{total}" + (" (resumed)" if initial else "") + ", started")

    def _next_mark(self, n: int) -> int:
        step = max(self.total // 10, 1)
        return (n // step + 1) * step

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.n >= self.next_report and self.n < self.total:
            self.next_report = self._next_mark(self.n)
            elapsed = time.perf_counter() - self.t0
            rate = (self.n - self.start_n) / max(elapsed, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            self._print(f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / self.total:.0f}%), "
                        f"{elapsed:.0f} s elapsed, ~{eta:.0f} s left{self.postfix}")

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in kw.items())

    def close(self) -> None:
        self._print(f"{self.desc}: step {self.n}/{self.total}, done in {time.perf_counter() - self.t0:.0f} s"
                    f"{self.postfix}")


def _progress(total: int, initial: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar when stderr is a terminal, plain lines (:class:`_LineProgress`) otherwise."""
    if not enabled:
        return None
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return _LineProgress(total, initial, desc, sys.stderr)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _LineProgress(total, initial, desc, sys.stderr)
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)


# ============================================================================ checkpoints
def latest_checkpoint(ckpt_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder named by ``ckpt_dir/latest`` (None if absent)."""
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    folder = Path(ckpt_dir) / name
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} names {name!r} but {folder} does not exist")
    return folder


# ============================================================================ trainer
class Trainer:
    """Runs ``steps`` optimizer updates of one model with a loss given by the loop.

    Args:
        cfg: The loop's config (the :class:`TrainConfig` fields are used here).
        rt: The :class:`Runtime`.
        name: Run name used in file names and the progress bar ("teacher", ...).
        model: The trainable module (on ``rt.device``).
        optimizer: Its optimizer (a fresh one; the state is restored on resume).
        data: The training split.
        total_steps: Number of updates of this run.
        out_dir: Folder of this run's files.
        metadata: JSON metadata stored with every weights file (schedule, round, ...).
        ema_decay: EMA decay, or None.
        hooks: Called as ``hook(step)`` after each update and its checkpoint/log/sample work
            (tests use it to kill the process right after a checkpoint).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        rt: Runtime,
        *,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: ImageData,
        total_steps: int,
        out_dir: Path,
        metadata: dict[str, Any],
        ema_decay: float | None = None,
        hooks: list[StepHook] | None = None,
    ) -> None:
        self.cfg, self.rt, self.name = cfg, rt, name
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.total_steps = total_steps
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metadata = metadata
        self.hooks = list(hooks or [])
        self.per_process = per_process_batch(cfg.batch_size, rt.world_size)
        self.cuda = rt.device.type == "cuda"
        self.use_bf16 = bool(cfg.mixed_precision) and native_bf16(rt.device)
        # channels_last only on CUDA: on CPU under bf16 autocast it made the tiny UNet's step slower
        # (0.74 s vs 0.45 s per batch of 64 on an AVX512-BF16 EPYC).
        if self.cuda and cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEMA(model, ema_decay) if ema_decay is not None else None
        self.stream = IndexStream(len(data), seed=cfg.seed)
        self.step = 0
        net: nn.Module = model
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[rt.device.index] if self.cuda else None)
        if cfg.compile:
            net = torch.compile(net)  # type: ignore[assignment]
        self.net = net
        self.params = [p for p in model.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- per-step randomness
    def _generator(self, step: int) -> torch.Generator:
        g = torch.Generator(device=self.rt.device)
        g.manual_seed(_mix(self.cfg.seed, step, 0x57E9))
        return g

    def draw_rand(self, g: torch.Generator, *shape: int) -> Tensor:
        """U[0, 1) of shape [B_global, *shape], sliced for this process."""
        return self.rt.shard(torch.rand((self.cfg.batch_size, *shape), generator=g, device=self.rt.device))

    def draw_randn(self, g: torch.Generator, *shape: int) -> Tensor:
        """N(0, 1) of shape [B_global, *shape], sliced for this process."""
        return self.rt.shard(torch.randn((self.cfg.batch_size, *shape), generator=g, device=self.rt.device))

    def draw_randint(self, g: torch.Generator, low: int, high: int, *shape: int) -> Tensor:
        """Integers in [low, high) of shape [B_global, *shape], sliced for this process."""
        return self.rt.shard(
            torch.randint(low, high, (self.cfg.batch_size, *shape), generator=g, device=self.rt.device)
        )

    def batch(self, step: int) -> StepBatch:
        """This process's slice of the global batch of ``step`` (see :class:`StepBatch`)."""
        from kdiff.data import to_model_range

        idx = self.rt.shard(self.stream.next(self.cfg.batch_size)).to(self.data.images.device)
        g = self._generator(step)
        x = to_model_range(self.data.images[idx])
        y = self.data.labels[idx]
        if self.cfg.random_flip:
            flip = self.draw_rand(g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.cuda and self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return StepBatch(x=x, y=y, generator=g)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast when ``mixed_precision`` and the device computes bf16 natively; else a no-op.

        Native means CUDA (Ampere and newer) or a CPU with AVX512-BF16/AMX
        (:func:`kdiff.train_step.native_bf16`); on other CPUs bf16 is emulated and slower than fp32.
        """
        if self.use_bf16:
            return torch.autocast(self.rt.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- checkpoints
    def _weights_meta(self, *, ema: bool) -> dict[str, Any]:
        return {**self.metadata, "step": self.step, "ema": ema, "config": self.cfg.to_dict()}

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_<step>/`` and then point ``checkpoints/latest`` at it."""
        folder = self.ckpt_dir / f"step_{self.step:07d}"
        if self.rt.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        self.rt.barrier()
        # Every process saves its own RNG states (dropout masks differ per process).
        save_training_state(folder / f"rng_rank{self.rt.rank}.pt", {"rng": capture_rng_state()})
        if self.rt.is_main:
            save_weights(folder / "model.safetensors", self.model.state_dict(), self._weights_meta(ema=False))
            if self.ema is not None:
                save_weights(folder / "ema.safetensors", self.ema.module.state_dict(), self._weights_meta(ema=True))
            save_training_state(
                folder / "state.pt",
                {
                    "step": self.step,
                    "total_steps": self.total_steps,
                    "world_size": self.rt.world_size,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": {"kind": self.cfg.lr_schedule, "next_lr": lr_at(self.cfg, self.step, self.total_steps)},
                    "data_stream": self.stream.state_dict(),
                    "config": json.dumps(self.cfg.math_dict(), sort_keys=True),
                },
            )
        self.rt.barrier()
        if self.rt.is_main:
            atomic_write_bytes(self.ckpt_dir / "latest", folder.name.encode())
            self._prune(keep=self.cfg.keep_checkpoints, current=folder.name)
        self.rt.barrier()
        return folder

    def _prune(self, *, keep: int, current: str) -> None:
        folders = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())
        for old in folders[:-keep]:
            if old.name != current:
                shutil.rmtree(old, ignore_errors=True)

    def try_resume(self) -> bool:
        """Restore the latest checkpoint of ``out_dir`` if there is one (and ``cfg.resume``).

        Raises:
            CheckpointError: The checkpoint is corrupt, or was written with other settings
                (the message names the file and the differing fields).
        """
        folder = latest_checkpoint(self.ckpt_dir) if self.cfg.resume else None
        if folder is None:
            return False
        state_path = folder / "state.pt"
        state = load_training_state(state_path, map_location="cpu")
        saved_cfg = json.loads(state["config"])
        now = json.loads(json.dumps(self.cfg.math_dict(), sort_keys=True))
        diffs = [
            f"{k}: checkpoint has {saved_cfg.get(k)!r}, this run has {now.get(k)!r}"
            for k in sorted(set(saved_cfg) | set(now))
            if saved_cfg.get(k) != now.get(k)
        ]
        if diffs:
            raise CheckpointError(
                f"Cannot resume from {state_path}: it was written with other settings:\n  - "
                + "\n  - ".join(diffs)
                + f"\n(use another out_dir, or resume=False to start over in {self.out_dir})"
            )
        step = int(state["step"])
        weights = folder / "model.safetensors"
        sd, _ = load_weights(weights, expected={"step": step}, map_location=self.rt.device)
        load_state_dict_strict(self.model, sd, weights)
        if self.ema is not None:
            ema_path = folder / "ema.safetensors"
            sd, _ = load_weights(ema_path, expected={"step": step}, map_location=self.rt.device)
            load_state_dict_strict(self.ema.module, sd, ema_path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["data_stream"])
        rng_path = folder / f"rng_rank{self.rt.rank}.pt"
        if not rng_path.is_file():
            warnings.warn(f"{rng_path} is missing (run with another process count?); using rank 0's RNG state",
                          stacklevel=2)
            rng_path = folder / "rng_rank0.pt"
        restore_rng_state(load_training_state(rng_path)["rng"])
        self.step = step
        return True

    def save_final(self, path: Path, extra: dict[str, Any] | None = None) -> Path:
        """Save the weights to use (the EMA ones when there is an EMA) as ``path``."""
        if self.rt.is_main:
            module = self.ema.module if self.ema is not None else self.model
            meta = {**self._weights_meta(ema=self.ema is not None), **(extra or {})}
            save_weights(path, module.state_dict(), meta)
        self.rt.barrier()
        return path

    @property
    def eval_model(self) -> nn.Module:
        """The module to sample with: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    # ---------------------------------------------------------------- the loop
    def fit(
        self,
        compute_loss: Callable[[int], tuple[Tensor, dict[str, Tensor]]],
        *,
        sample: Callable[[], Tensor] | None = None,
    ) -> None:
        """Train until ``total_steps`` (resuming first if a checkpoint exists).

        Args:
            compute_loss: ``compute_loss(step) -> (loss, metrics)``; it calls
                :meth:`batch` and the model ``self.net`` under :meth:`autocast` itself.
                ``metrics`` are scalar tensors, read only at log steps.
            sample: Returns images in [-1, 1] for the PNG grids (rank 0), or None.
        """
        cfg, rt = self.cfg, self.rt
        resumed = self.try_resume()
        if rt.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        log = _MetricsLog(self.out_dir, enabled=rt.is_main, tensorboard=cfg.tensorboard)
        if resumed and rt.is_main:
            log.write({"event": "resumed", "step": self.step})
        bar = _progress(self.total_steps, self.step, rt.is_main and cfg.progress, self.name)
        sums: Tensor | None = None
        names: list[str] = []
        count, t_last, step_last, paused = 0, time.perf_counter(), self.step, 0.0
        self.model.train()
        try:
            while self.step < self.total_steps:
                step = self.step
                lr = lr_at(cfg, step, self.total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, metrics = compute_loss(step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.model)
                self.step = step + 1
                # Accumulate on device; no host sync until a log step.
                values = torch.stack([loss.detach().float(), *(v.detach().float().reshape(()) for v in metrics.values())])
                if sums is None or len(names) != values.numel():
                    names, sums, count = ["loss", *metrics.keys()], torch.zeros_like(values), 0
                sums += values
                count += 1
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    means = sums / count
                    if rt.distributed:
                        dist.all_reduce(means)
                        means /= rt.world_size
                    now = time.perf_counter()
                    record: dict[str, Any] = {"step": self.step, "lr": lr}
                    record.update(zip(names, means.tolist(), strict=True))
                    elapsed = max(now - t_last - paused, 1e-9)  # without sampling/checkpoint time
                    record["steps_per_s"] = (self.step - step_last) / elapsed
                    record["images_per_s"] = record["steps_per_s"] * cfg.batch_size
                    log.write(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.1f}")
                    sums, count, t_last, step_last, paused = torch.zeros_like(sums), 0, now, self.step, 0.0
                last = self.step == self.total_steps
                t_pause = time.perf_counter()
                if sample is not None and rt.is_main and cfg.sample_every >= 0 and (
                    last or (cfg.sample_every > 0 and self.step % cfg.sample_every == 0)
                ):
                    self.save_samples(sample)
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                    self.save_checkpoint()
                paused += time.perf_counter() - t_pause
                for hook in self.hooks:
                    hook(self.step)
        finally:
            if bar is not None:
                bar.close()
            log.close()

    def save_samples(self, sample: Callable[[], Tensor]) -> Path:
        """Write ``samples/step_<step>.png`` from ``sample()`` (model in eval mode, no grad)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                images = sample()
        finally:
            self.model.train(was_training)
        return save_image_grid(self.out_dir / "samples" / f"step_{self.step:07d}.png", images)


def fixed_noise(cfg: TrainConfig, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """The same starting noise for every sample grid of a run (drawn on the CPU)."""
    g = torch.Generator().manual_seed(_mix(cfg.seed, 0x5A4D))
    return torch.randn(shape, generator=g).to(device)

