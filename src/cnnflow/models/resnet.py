"""CIFAR-style ResNets: resnet20/56 (He et al. 2016, sec. 4.2) and the CIFAR ResNet-18.

resnet20/56: a 3x3 stem conv with `width` (16) channels, then 3 stages of n basic blocks
with width x (1, 2, 4) channels, the first block of stages 2 and 3 striding by 2; depth =
6n + 2 (n = 3: 20 layers, 0.27M parameters; n = 9: 56 layers, 0.85M). Shortcuts are the
paper's option A: identity, or when the shape changes, subsample by 2 and zero-pad the new
channels. That adds no parameters, which is why the paper chose it for CIFAR and why the
counts above match its table.

resnet18: the usual CIFAR variant of the ImageNet ResNet-18: a 3x3 stride-1 stem conv and
no max pool (a 7x7/2 conv + pool would shrink 32x32 to 8x8 before any block), 4 stages of
2 basic blocks with width x (1, 2, 4, 8) = 64..512 channels; 11.2M parameters. Shortcuts
are option B (1x1 conv + norm when the shape changes), as in the ImageNet model, so its
weights keep the familiar layout. depth = 8n + 2 gives n blocks per stage (18: n = 2).

Every block keeps H and W or halves them (rounding up), so any H, W >= 1 works; below 8
pixels the last stages just run on 1x1 maps.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from cnnflow.config import ModelConfig
from cnnflow.errors import ConfigError
from cnnflow.models.chain import Stage, classifier_head, init_weights
from cnnflow.models.norm import check_norm, make_norm


class PadShortcut(nn.Module):
    """Option A shortcut: take every `stride`-th pixel and zero-pad the extra channels."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.before = (cout - cin) // 2  # channels of zeros in front of the input's
        self.after = cout - cin - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # ceil(H / stride) rows: the same size the strided 3x3 conv (padding 1) gives.
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))


class BasicBlock(nn.Module):
    """conv3x3 -> norm -> ReLU -> conv3x3 -> norm, plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, *, stride: int, norm: str, groups: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, cout, groups)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, cout, groups)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(cin, cout, stride)
        else:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                    norm=make_norm(norm, cout, groups),
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Sequential):
    """Children `stem`, `stage1`..`stageK` (Stages: each block a pipeline cut point), `head`."""


def _resnet(
    cfg: ModelConfig,
    *,
    in_shape: tuple[int, int, int],
    num_classes: int,
    blocks_per_stage: list[int],
    default_width: int,
    shortcut: str,
) -> ResNet:
    width = cfg.width or default_width
    widths = [width * 2**i for i in range(len(blocks_per_stage))]
    check_norm(cfg.norm, cfg.groups, widths)
    stem = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_shape[2], width, 3, padding=1, bias=False),
            norm=make_norm(cfg.norm, width, cfg.groups),
            relu=nn.ReLU(inplace=True),
        )
    )
    children: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
    cin = width
    for i, (n, cout) in enumerate(zip(blocks_per_stage, widths, strict=True)):
        blocks = []
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            blocks.append(
                BasicBlock(
                    cin, cout, stride=stride, norm=cfg.norm, groups=cfg.groups, shortcut=shortcut
                )
            )
            cin = cout
        children[f"stage{i + 1}"] = Stage(*blocks)
    children["head"] = classifier_head(cin, num_classes, cfg.dropout)
    model = ResNet(children)
    init_weights(model)
    return model


def _blocks(cfg: ModelConfig, name: str, *, default: int, per_block: int, stages: int) -> int:
    """Blocks per stage from `cfg.depth` = per_block * n + 2 (0 = the name's depth)."""
    depth = cfg.depth or default
    n, rest = divmod(depth - 2, per_block)
    if n < 1 or rest:
        examples = ", ".join(str(per_block * k + 2) for k in range(1, 4))
        raise ConfigError(
            f"model.depth: expected 0 or {per_block}n+2 ({examples}, ...) for {name} "
            f"({stages} stages of n basic blocks), got {cfg.depth!r}"
        )
    return n


def _cifar_resnet(cfg: ModelConfig, name: str, default: int, *,
                  in_shape: tuple[int, int, int], num_classes: int) -> ResNet:
    """He et al. 2016 sec. 4.2: 3 stages of n blocks, option A shortcuts, width 16/32/64."""
    n = _blocks(cfg, name, default=default, per_block=6, stages=3)
    return _resnet(cfg, in_shape=in_shape, num_classes=num_classes, blocks_per_stage=[n] * 3,
                   default_width=16, shortcut="A")


def resnet20(cfg: ModelConfig, *, in_shape: tuple[int, int, int], num_classes: int) -> ResNet:
    """ResNet-20 (or any 6n+2 with `depth`)."""
    return _cifar_resnet(cfg, "resnet20", 20, in_shape=in_shape, num_classes=num_classes)


def resnet56(cfg: ModelConfig, *, in_shape: tuple[int, int, int], num_classes: int) -> ResNet:
    """ResNet-56 (or any 6n+2 with `depth`)."""
    return _cifar_resnet(cfg, "resnet56", 56, in_shape=in_shape, num_classes=num_classes)


def resnet18(cfg: ModelConfig, *, in_shape: tuple[int, int, int], num_classes: int) -> ResNet:
    """CIFAR ResNet-18 (or any 8n+2 with `depth`), option B shortcuts, width 64..512."""
    n = _blocks(cfg, "resnet18", default=18, per_block=8, stages=4)
    return _resnet(
        cfg,
        in_shape=in_shape,
        num_classes=num_classes,
        blocks_per_stage=[n] * 4,
        default_width=64,
        shortcut="B",
    )
