"""Configuration: one dataclass per concern, each mapped 1:1 to a section of params.yaml.

    params = load_params("params.yaml", overrides=["prepare.seed=3"])
    params.prepare.seed  # -> 3

The dataclasses live in `cnnflow.configs` (one module per owner; `LaunchConfig` in
`cnnflow.configs.launch`) and are all importable from here; this module assembles them into
`Params` and loads, merges and validates. Nothing here imports torch.

Every section is validated on load. An unknown key, a value of the wrong type or an
out-of-range value raises `ConfigError` with a one-line message that names where the value
came from, the key (`prepare.seed`) and what was expected:
`params.yaml: prepare.seed: expected an int, got 'x'` for a file value,
`--set prepare.seed: expected an int, got 'x'` for an override. The CLI, DVC
(`dvc exp run -S prepare.seed=3`, which edits params.yaml) and the KFP pipeline
(parameter `prepare_seed`) all set the same fields.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cnnflow.configs.checkpoint import CheckpointConfig
from cnnflow.configs.data import SOURCES, PrepareConfig, ShardConfig
from cnnflow.configs.evaluate import EvaluateConfig
from cnnflow.configs.launch import LaunchConfig
from cnnflow.configs.model import ModelConfig
from cnnflow.configs.optim import OptimConfig
from cnnflow.configs.parallel import ParallelConfig
from cnnflow.configs.tracking import TrackingConfig
from cnnflow.configs.train import TrainConfig
from cnnflow.errors import ConfigError

__all__ = [
    "OVERRIDE", "SOURCES", "CheckpointConfig", "EvaluateConfig", "LaunchConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "Params", "PrepareConfig",
    "ShardConfig", "TrackingConfig", "TrainConfig", "build_section", "flatten",
    "load_params", "params_from_dict", "parse_override", "to_dict",
]

OVERRIDE = "--set"
"""How errors name an override's origin: the option of the CLI and `python -m cnnflow.train`
(and what a PyTorchJob's pods are given), so the message points at the flag to fix."""


@dataclass(kw_only=True)
class Params:
    """All sections of params.yaml."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


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
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}", key=key)


def build_section(cls: type, name: str, values: dict[str, Any] | None) -> Any:
    """Build dataclass `cls` for params section `name` from a mapping, validating it."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys to values, got {values!r}",
                          key=name)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"{name}.{key}: unknown key; expected one of {', '.join(sorted(known))}",
                key=f"{name}.{key}",
            )
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{name}: {exc}", key=name) from None


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Params)
    return {f.name: hints[f.name] for f in dataclasses.fields(Params)}


def parse_override(text: str) -> tuple[str, str, Any]:
    """`"prepare.seed=3"` -> `("prepare", "seed", 3)`; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"{OVERRIDE} {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{OVERRIDE} {text!r}: expected section.key=value, e.g. prepare.seed=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts[0], parts[1], value


def _origin(key: str, where: dict[str, str], fallback: str) -> str:
    """The prefix naming where the value(s) behind error key `key` came from.

    `key` is `section.name`, `section.a+b+c` or `section.a/b` (a check over several keys),
    `section.name[i]` (a list item) or `section` (the whole section). When an override
    set any of those keys it is named; else the file, if it set one; else (defaults only)
    `fallback`: the file when there is one, so a missing key points at where to add it.
    """
    section, _, rest = key.partition(".")
    if rest:
        names = [f"{section}.{n.split('[')[0]}" for n in re.split(r"[+/]", rest)]
    else:
        names = [k for k in where if k.partition(".")[0] == section]
    found = [where[n] for n in names if n in where]
    if f"{OVERRIDE} " in found:
        return f"{OVERRIDE} "
    return found[0] if found else fallback


def params_from_dict(
    data: dict[str, Any] | None, overrides: Iterable[str] = (), *, origin: str = ""
) -> Params:
    """Validate a params mapping (plus `section.key=value` overrides) into `Params`.

    `origin` names where `data` came from (the params file's path): an error about one of
    its values starts with `<origin>: `, one about an override's value with `--set `.
    """
    from_file = f"{origin}: " if origin else ""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(
            f"{from_file}params: expected a mapping of sections, got {type(data).__name__}"
        )
    sections = _sections()
    merged: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}  # "section.key" -> prefix naming where its value came from
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(
                f"{from_file}{name}: unknown section; expected one of {', '.join(sections)}",
                key=str(name),
            )
        if values is not None and not isinstance(values, dict):
            raise ConfigError(
                f"{from_file}{name}: expected a mapping of keys to values, got {values!r}",
                key=name,
            )
        merged[name] = dict(values or {})
        where.update({f"{name}.{key}": from_file for key in merged[name]})
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in sections:
            raise ConfigError(
                f"{OVERRIDE} {section}.{key}: unknown section {section!r}; "
                f"expected one of {', '.join(sections)}",
                key=f"{section}.{key}",
            )
        merged.setdefault(section, {})[key] = value
        where[f"{section}.{key}"] = f"{OVERRIDE} "
    built = {}
    for name, cls in sections.items():
        try:
            built[name] = build_section(cls, name, merged.get(name))
        except ConfigError as exc:
            prefix = _origin(exc.key, where, from_file)
            raise ConfigError(f"{prefix}{exc}", key=exc.key) from None
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
    return params_from_dict(data, overrides, origin=str(path))


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
