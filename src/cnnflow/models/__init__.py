"""Single-device CNNs behind a registry, and the dict that rebuilds one without training code.

    model = build_model(ModelConfig(name="resnet20"), in_shape=(32, 32, 3), num_classes=10)
    logits = model(images)  # images: float (N, C, H, W); logits: (N, num_classes)

`in_shape` is (H, W, C), the order the prepared data set stores; the model itself takes
channels-first batches. Models know nothing of parallelism: the parallelize step uses
`pipeline_blocks`/`blocks_module` to cut them into pipeline stages and
`convert_norm_for_distributed` for `norm: syncbatch`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from cnnflow.config import ModelConfig, build_section
from cnnflow.errors import ConfigError
from cnnflow.models.chain import BlockSubset, Stage, blocks_module, pipeline_blocks
from cnnflow.models.norm import AllReduceBatchNorm2d, convert_norm_for_distributed
from cnnflow.models.resnet import resnet18, resnet20, resnet56
from cnnflow.models.small_cnn import small_cnn

__all__ = [
    "MODELS",
    "AllReduceBatchNorm2d",
    "BlockSubset",
    "CONFIG_FORMAT",
    "Stage",
    "blocks_module",
    "build_model",
    "config_from_dict",
    "convert_norm_for_distributed",
    "count_parameters",
    "model_config_dict",
    "model_from_config_dict",
    "pipeline_blocks",
]

Builder = Callable[..., nn.Module]  # (cfg, *, in_shape, num_classes) -> nn.Module

MODELS: dict[str, Builder] = {
    "small_cnn": small_cnn,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet18": resnet18,
}

CONFIG_FORMAT = 1  # bump when a key's meaning changes; readers refuse formats they lack


def _check_shape(in_shape: Any, num_classes: Any) -> tuple[int, int, int]:
    ok = (
        isinstance(in_shape, (tuple, list))
        and len(in_shape) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in in_shape)
    )
    if not ok:
        raise ConfigError(
            f"model.in_shape: expected (height, width, channels) of ints >= 1, got {in_shape!r}"
        )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"model.num_classes: expected an int >= 1, got {num_classes!r}")
    return (in_shape[0], in_shape[1], in_shape[2])


def build_model(cfg: ModelConfig, *, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build `cfg.name` for images of `in_shape` = (H, W, C) and `num_classes` outputs.

    Initialisation draws from torch's global RNG: seed it for identical models.
    """
    builder = MODELS.get(cfg.name)
    if builder is None:
        names = ", ".join(repr(n) for n in MODELS)
        raise ConfigError(f"model.name: expected one of {names}, got {cfg.name!r}")
    shape = _check_shape(in_shape, num_classes)
    return builder(cfg, in_shape=shape, num_classes=num_classes)


def model_config_dict(
    cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int
) -> dict[str, Any]:
    """Everything `model_from_config_dict` needs, as JSON-serialisable values."""
    shape = _check_shape(in_shape, num_classes)
    return {
        "format": CONFIG_FORMAT,
        "name": cfg.name,
        "width": cfg.width,
        "depth": cfg.depth,
        "norm": cfg.norm,
        "groups": cfg.groups,
        "dropout": cfg.dropout,
        "in_shape": list(shape),
        "num_classes": num_classes,
    }


def config_from_dict(d: dict[str, Any]) -> tuple[ModelConfig, tuple[int, int, int], int]:
    """Validate a saved model dict into (ModelConfig, in_shape, num_classes)."""
    if not isinstance(d, dict):
        raise ConfigError(f"model: expected a mapping, got {type(d).__name__}")
    if d.get("format") != CONFIG_FORMAT:
        raise ConfigError(f"model.format: expected {CONFIG_FORMAT}, got {d.get('format')!r}")
    missing = [k for k in ("name", "in_shape", "num_classes") if k not in d]
    if missing:
        raise ConfigError(f"model.{missing[0]}: missing from the saved model config")
    values = {k: v for k, v in d.items() if k not in ("format", "in_shape", "num_classes")}
    cfg = build_section(ModelConfig, "model", values)
    return cfg, _check_shape(d["in_shape"], d["num_classes"]), d["num_classes"]


def model_from_config_dict(d: dict[str, Any]) -> nn.Module:
    """Rebuild the (freshly initialised) model a `model_config_dict` describes; load the
    saved state dict into it afterwards."""
    cfg, in_shape, num_classes = config_from_dict(d)
    return build_model(cfg, in_shape=in_shape, num_classes=num_classes)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared tensors counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)
