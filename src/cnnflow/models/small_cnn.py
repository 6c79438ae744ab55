"""A small CNN for 8x8 (sklearn digits) and 28x28 (MNIST-like) images.

`depth` blocks of conv3x3 -> norm -> ReLU, each followed by a 2x2 max pool while the
feature map is at least 4 pixels on its shorter side (so 8x8 pools twice, to 2x2, and
never reaches 1x1 before the last conv). Channels start at `width` and double per block
for the first four blocks, then stay (32, 64, 128, 256, 256, ...): deeper small_cnns grow
in depth, not in a 2^depth parameter count. Global average pool, dropout, linear.

Default (depth 2, width 64) on 8x8x1: about 76k parameters; it reaches ~98% test
accuracy on sklearn digits in a few epochs.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from cnnflow.config import ModelConfig
from cnnflow.models.chain import Stage, classifier_head, init_weights
from cnnflow.models.norm import check_norm, make_norm

DEFAULT_WIDTH = 64  # digits: 98%+ test accuracy in ~10 s on 2 cores; 32 gives ~97%
DEFAULT_DEPTH = 2
MAX_DOUBLINGS = 3  # channels stop growing after width * 2**3


class ConvBlock(nn.Sequential):
    """conv3x3 (no bias: the norm's shift replaces it) -> norm -> ReLU [-> maxpool 2]."""

    def __init__(self, cin: int, cout: int, *, norm: str, groups: int, pool: bool):
        layers = OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
            norm=make_norm(norm, cout, groups),
            relu=nn.ReLU(inplace=True),
        )
        if pool:
            layers["pool"] = nn.MaxPool2d(2)
        super().__init__(layers)


class SmallCNN(nn.Sequential):
    """Children: `blocks` (a Stage: each ConvBlock is a pipeline cut point) and `head`."""

    def __init__(self, blocks: Stage, head: nn.Sequential):
        super().__init__(OrderedDict(blocks=blocks, head=head))


def small_cnn(cfg: ModelConfig, *, in_shape: tuple[int, int, int], num_classes: int) -> SmallCNN:
    """Build the small CNN for images of `in_shape` = (H, W, C); input is (N, C, H, W)."""
    height, width_px, channels = in_shape
    depth = cfg.depth or DEFAULT_DEPTH
    width = cfg.width or DEFAULT_WIDTH
    outs = [width * 2 ** min(i, MAX_DOUBLINGS) for i in range(depth)]
    check_norm(cfg.norm, cfg.groups, outs)
    blocks = []
    side = min(height, width_px)  # pixels on the shorter side of the current feature map
    cin = channels
    for cout in outs:
        pool = side >= 4
        blocks.append(ConvBlock(cin, cout, norm=cfg.norm, groups=cfg.groups, pool=pool))
        side = side // 2 if pool else side
        cin = cout
    model = SmallCNN(Stage(*blocks), classifier_head(cin, num_classes, cfg.dropout))
    init_weights(model)
    return model
