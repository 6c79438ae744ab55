"""What one rank computes on a batch: mixed precision, the loss, evaluation.

The strategies (`cnnflow.distributed.strategy`, `fsdp`, `pipeline`) call these on
whatever module they wrap; nothing here reads files or logs. `evaluate` sums over ranks
with one all-reduce when asked, so every rank gets the same figures.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def autocast(precision: str, device: torch.device):
    """bf16 autocast for `train.precision: bf16`; a null context for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def forward_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 precision: str, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of one micro-batch; the loss is the micro-batch mean."""
    with autocast(precision, images.device):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    return loss, logits


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, precision: str = "fp32",
             distributed: bool = False) -> dict[str, float]:
    """Loss and accuracy over `batches` of (normalised images, labels), summed over ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        with autocast(precision, device):
            logits = model(images)
        sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        sums[1] += (logits.argmax(1) == labels).sum().item()
        sums[2] += labels.numel()
    if distributed:
        dist.all_reduce(sums)
    model.train(was_training)
    count = max(1.0, sums[2].item())
    return {"loss": sums[0].item() / count, "accuracy": sums[1].item() / count,
            "count": sums[2].item()}
