"""The pure pieces of training: augmentation, the optimizer, the learning-rate schedule.

Nothing here reads files, logs to a tracker or knows how many processes there are. The
forward/loss/evaluation of a batch is `cnnflow.distributed.compute` (the strategies call
it); the epoch loop is `cnnflow.train.epochs`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cnnflow.config import OptimConfig


def augment(images: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """Random crop with zero padding (1/8 of the side, at least 1 px) and optional flip.

    Works on uint8 NCHW before normalisation. The offsets come from `generator`, which
    the trainer seeds by (seed, epoch, step, stream), so a sample's augmentation does not
    depend on the world size or on whether the run was resumed.
    """
    n, _, h, w = images.shape
    pad = max(1, min(h, w) // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    if h * w > 256:
        # large images: a slice copy per sample (row memcpy) beats an element gather
        out = torch.empty_like(images)
        for i in range(n):
            dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
            crop = padded[i, :, dy : dy + h, dx : dx + w]
            out[i] = crop.flip(-1) if flips[i] else crop
        return out
    # small images (digits): one gather for the whole batch instead of n Python-level
    # slices (0.2 ms against 1.5 ms for 64 8x8 images); columns reversed where flipped
    rows = offsets[:, :1] + torch.arange(h)
    cols = torch.where(flips[:, None], torch.arange(w - 1, -1, -1), torch.arange(w))
    cols = offsets[:, 1:] + cols
    batch = torch.arange(n)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def build_optimizer(params, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas),
                                 weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The configured lr, linearly scaled by global_batch / base_batch_size when asked."""
    return cfg.lr * global_batch / cfg.base_batch_size if cfg.scale_lr else cfg.lr


def lr_factor(cfg: OptimConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    Warmup rises linearly from 0.1 to 1 (Goyal et al. 2017 start at lr/k); then cosine to
    0 over the remaining steps, a step decay every `step_epochs`, or constant.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return 0.1 + 0.9 * step / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.gamma ** (step // (cfg.step_epochs * max(1, steps_per_epoch)))
    return 1.0
