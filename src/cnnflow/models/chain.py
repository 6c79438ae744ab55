"""The shape every cnnflow model has, so pipeline parallelism can cut it without knowing it.

A model is an `nn.Sequential` of named top-level children (`stem`, `stage1`, ..., `head`).
A child that is a `Stage` is a run of blocks that may be cut between any two of them (a
ResNet stage: each residual block is a cut point); any other child is one block. Running
`pipeline_blocks(model)` in order equals `model(x)`, and `blocks_module` builds a stage's
module whose parameter names are the full model's (`stage2.1.conv1.weight`), so a
checkpoint of the whole model loads into any pipeline stage and back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


class Stage(nn.Sequential):
    """A run of blocks that pipeline parallelism may split between any two of them."""


def classifier_head(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Global average pool -> flatten -> dropout -> linear: any H, W gives (N, num_classes)."""
    return nn.Sequential(
        OrderedDict(
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            dropout=nn.Dropout(dropout),
            fc=nn.Linear(channels, num_classes),
        )
    )


def pipeline_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ordered splittable blocks of a cnnflow model as (qualified name, module).

    Names are paths usable with `model.get_submodule` and as FQN prefixes of the
    state dict: `stem`, `stage1.0`, ..., `head` (resnets) or `blocks.0`, ..., `head`.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"expected a cnnflow model (an nn.Sequential), got {type(model)}")
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, Stage):
            out.extend((f"{name}.{i}", block) for i, block in child.named_children())
        else:
            out.append((name, child))
    return out


class BlockSubset(nn.Module):
    """Some consecutive blocks of a model, under their original qualified names.

    The blocks are shared with the model, not copied: drop the model to free the rest.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.block_names = list(names)
        for name in self.block_names:
            parent: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, model.get_submodule(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.block_names:
            x = self.get_submodule(name)(x)
        return x


def blocks_module(model: nn.Module, names: Sequence[str]) -> BlockSubset:
    """A module running the blocks `names` of `model` in order (one pipeline stage).

    `names` must be a contiguous run of `pipeline_blocks(model)` names, so a stage
    is always a prefix-to-suffix slice of the forward pass.
    """
    order = [n for n, _ in pipeline_blocks(model)]
    names = list(names)
    if not names:
        raise ValueError("blocks_module: expected at least one block name")
    unknown = [n for n in names if n not in order]
    if unknown:
        raise ValueError(f"blocks_module: unknown blocks {unknown}; expected names from {order}")
    start = order.index(names[0])
    if order[start : start + len(names)] != names:
        raise ValueError(f"blocks_module: expected consecutive blocks in order, got {names}")
    return BlockSubset(model, names)


def init_weights(model: nn.Module) -> None:
    """He (kaiming) normal for convs, weight 1 / bias 0 for norms, PyTorch's default
    (kaiming uniform) for linears: deterministic under `torch.manual_seed`."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # fan_out: keeps the backward signal's variance through ReLU stacks (He 2015).
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
