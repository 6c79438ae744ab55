"""Configuration: one dataclass per concern, each mapped 1:1 to a section of params.yaml.

    params = load_params("params.yaml", overrides=["prepare.seed=3"])
    params.prepare.seed  # -> 3

Every section is validated on load. An unknown key, a value of the wrong type or an
out-of-range value raises `ConfigError` with a one-line message that names the key
(`prepare.seed`) and what was expected. The CLI, DVC (`dvc exp run -S prepare.seed=3`)
and the KFP pipeline (parameter `prepare_seed`) all set the same fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cnnflow.errors import ConfigError

SOURCES = ("digits", "synthetic", "imagefolder", "idx", "cifar")


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


@dataclass(kw_only=True)
class PrepareConfig:
    """Read a source, split it, and write `out_dir` (uint8 arrays + dataset.json)."""

    source: Literal["digits", "synthetic", "imagefolder", "idx", "cifar"] = "digits"
    """Where the images come from. `digits` ships inside scikit-learn (no download)."""
    path: str = ""
    """Input for imagefolder (root/<class>/<image>), idx (a directory holding the
    *-images-idx3-ubyte[.gz] and *-labels-idx1-ubyte[.gz] files) and cifar (the
    cifar-10-batches-py directory). Unused by digits and synthetic."""
    out_dir: str = "data/prepared"
    """Where the prepared data set is written (atomically: temp dir, then rename)."""
    seed: int = 0
    """Seed of the stratified split (and of the synthetic generator)."""
    train_ratio: float = 0.8
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    """Split ratios; they must sum to 1. Each class must get >= 1 sample in every split."""
    height: int = 0
    width: int = 0
    """Image size in pixels. imagefolder resizes to it (0 = 32); synthetic generates it
    (0 = 32); digits, idx and cifar keep their native size and require 0 or that size."""
    channels: int = 0
    """1 (grayscale) or 3 (RGB). imagefolder converts to it (0 = 3); synthetic generates
    it (0 = 3); digits/idx are 1 and cifar is 3 (0 or that value)."""
    num_images: int = 10_000
    """synthetic only: how many images (>= 1,000,000 works: generated in chunks)."""
    num_classes: int = 10
    """synthetic only: how many classes."""
    skip_corrupt: bool = False
    """imagefolder only: skip unreadable images (counted in the log) instead of failing."""
    workers: int = 2
    """Processes for generating/encoding (synthetic and imagefolder); 1 = in-process."""

    def __post_init__(self) -> None:
        for name in ("train_ratio", "val_ratio", "test_ratio"):
            value = getattr(self, name)
            _check(0.0 < value < 1.0, f"prepare.{name}", "a ratio in (0, 1)", value)
        total = self.train_ratio + self.val_ratio + self.test_ratio
        _check(
            abs(total - 1.0) < 1e-9,
            "prepare.train_ratio+val_ratio+test_ratio",
            "a sum of 1",
            round(total, 12),
        )
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(0 <= value <= 4096, f"prepare.{name}", "0 (native) or 1..4096 pixels", value)
        _check(self.channels in (0, 1, 3), "prepare.channels", "0, 1 or 3", self.channels)
        _check(self.num_images >= 1, "prepare.num_images", "an int >= 1", self.num_images)
        _check(
            2 <= self.num_classes <= 65535, "prepare.num_classes", "2..65535", self.num_classes
        )
        _check(1 <= self.workers <= 64, "prepare.workers", "1..64", self.workers)
        needs_path = self.source in ("imagefolder", "idx", "cifar")
        _check(
            bool(self.path) or not needs_path,
            "prepare.path",
            f"the input path for source {self.source!r}",
            self.path,
        )


@dataclass(kw_only=True)
class ShardConfig:
    """Write WebDataset tar shards of the prepared data set plus a checksummed manifest."""

    out_dir: str = "data/shards"
    """Shard directory: <split>-000000.tar ... and manifest.json."""
    samples_per_shard: int = 1000
    """Samples per tar shard. Rule of thumb: 100-500 MB shards on object storage;
    here small shards let several ranks and loader workers each own whole shards."""
    workers: int = 2
    """Processes writing shards in parallel (1 = in-process)."""

    def __post_init__(self) -> None:
        _check(
            self.samples_per_shard >= 1,
            "shard.samples_per_shard",
            "an int >= 1",
            self.samples_per_shard,
        )
        _check(1 <= self.workers <= 64, "shard.workers", "1..64", self.workers)


@dataclass(kw_only=True)
class ModelConfig:
    """A single-device CNN, rebuilt from this section plus the data set's shape/classes."""

    name: Literal["small_cnn", "resnet20", "resnet56", "resnet18"] = "small_cnn"
    """small_cnn for 8x8/28x28 digits; resnet20/56 (CIFAR style); resnet18 (CIFAR variant)."""
    width: int = 0
    """Channels of the first stage (0 = the model's default: 32 small_cnn, 16 resnet20/56,
    64 resnet18). Later stages double it."""
    depth: int = 0
    """small_cnn: conv blocks (0 = 2). resnet: 0 keeps the name's depth (20/56/18)."""
    norm: Literal["batch", "syncbatch", "group"] = "batch"
    """batch = BatchNorm (per-rank statistics), syncbatch = SyncBatchNorm across ranks,
    group = GroupNorm (no cross-sample statistics: world-size invariant)."""
    groups: int = 8
    """GroupNorm groups (norm=group); must divide every stage's channel count."""
    dropout: float = 0.0
    """Dropout before the classifier, in [0, 1)."""

    def __post_init__(self) -> None:
        _check(0 <= self.width <= 4096, "model.width", "0 (default) or 1..4096", self.width)
        _check(0 <= self.depth <= 64, "model.depth", "0 (default) or 1..64", self.depth)
        _check(self.groups >= 1, "model.groups", "an int >= 1", self.groups)
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "a number in [0, 1)", self.dropout)


@dataclass(kw_only=True)
class Params:
    """All sections of params.yaml."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


# ---------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    return {int: "an int", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Return `value` as `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                continue
    elif origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    elif tp is Any:
        return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this loader does not know is a bug
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build_section(cls: type, name: str, values: dict[str, Any] | None) -> Any:
    """Build dataclass `cls` for params section `name` from a mapping, validating it."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"{name}.{key}: unknown key; expected one of {', '.join(sorted(known))}"
            )
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{name}: {exc}") from None


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Params)
    return {f.name: hints[f.name] for f in dataclasses.fields(Params)}


def parse_override(text: str) -> tuple[str, str, Any]:
    """`"prepare.seed=3"` -> `("prepare", "seed", 3)`; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. prepare.seed=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts[0], parts[1], value


def params_from_dict(data: dict[str, Any] | None, overrides: Iterable[str] = ()) -> Params:
    """Validate a params mapping (plus `section.key=value` overrides) into `Params`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"params: expected a mapping of sections, got {type(data).__name__}")
    sections = _sections()
    merged: dict[str, dict[str, Any]] = {}
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(
                f"{name}: unknown section; expected one of {', '.join(sections)}"
            )
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping of keys to values, got {values!r}")
        merged[name] = dict(values or {})
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in sections:
            raise ConfigError(
                f"override {text!r}: unknown section {section!r}; "
                f"expected one of {', '.join(sections)}"
            )
        merged.setdefault(section, {})[key] = value
    built = {name: build_section(cls, name, merged.get(name)) for name, cls in sections.items()}
    return Params(**built)


def load_params(path: str | Path | None = "params.yaml", overrides: Iterable[str] = ()) -> Params:
    """Load params.yaml (defaults when `path` is None) and apply overrides."""
    if path is None:
        return params_from_dict({}, overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML") from None
    try:
        return params_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_dict(params: Any) -> dict[str, Any]:
    """A section (or all of Params) as a plain dict, for logging and params.yaml."""
    return dataclasses.asdict(params)


def flatten(params: Params) -> dict[str, Any]:
    """`{"prepare.seed": 0, ...}`: the keys KFP parameters and MLflow params use."""
    out = {}
    for section, values in to_dict(params).items():
        for key, value in values.items():
            out[f"{section}.{key}"] = value
    return out
