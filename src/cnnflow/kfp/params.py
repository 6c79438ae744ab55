"""params.yaml keys as KFP pipeline parameters, and how components receive them.

    kfp_name("prepare.seed")            # -> "prepare_seed"
    pipeline_parameters()               # {"prepare_seed": (int, 0), ...}: the signature
    to_arguments(params)                # {"prepare_seed": 3, ...}: a run's arguments
    encode({"prepare_seed": channel}, ["prepare"])   # in the pipeline body: one string
    decode(text)                        # in the component: a validated `Params`

Why a string: a lightweight component has a fixed Python signature, and the pipeline has
one parameter per key (122 of them). The pipeline body formats the parameters it forwards
into one string (`key=value` records separated by ASCII RS, 0x1E): KFP's compiler turns
each embedded parameter into a task input and the backend (or kfp.local) substitutes the
values, rendered as text: ints may arrive as `3.0` (kfp.local), booleans as `true`, lists
as JSON. `decode` parses each value by the type of its field's default and validates the
whole set with `params_from_dict`, so a component refuses a bad value with the key's name.
Each component gets only the sections it needs, so a cached stage (prepare, shard) is not
invalidated by a change of, say, `optim.lr`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from cnnflow.config import Params, flatten, params_from_dict
from cnnflow.errors import ConfigError

SEP = "\x1e"  # ASCII record separator: cannot occur in a params value typed on a keyboard
TYPES = (bool, int, float, str, list)

# Pipeline parameters that are not params.yaml keys.
WORKSPACE = "workspace"
"""Directory the stages run in (relative paths of params.yaml resolve against it): the PVC's
mount path in the cluster, the repository (or a test's temp dir) under kfp.local."""
EXTRA = {WORKSPACE: (str, "/workspace")}


def kfp_name(key: str) -> str:
    """`prepare.seed` -> `prepare_seed` (KFP names cannot contain dots)."""
    return key.replace(".", "_")


def _keys() -> dict[str, Any]:
    """{dotted key: default}, in params.yaml order."""
    return flatten(Params())


def pipeline_parameters() -> dict[str, tuple[type, Any]]:
    """{kfp name: (type, default)} for every params.yaml key, then `workspace`."""
    out: dict[str, tuple[type, Any]] = {}
    for key, default in _keys().items():
        kind = next(t for t in TYPES if isinstance(default, t))
        out[kfp_name(key)] = (kind, default)
    return {**out, **EXTRA}


def to_arguments(params: Params) -> dict[str, Any]:
    """A run's arguments: {kfp name: value} for every key of validated `params`."""
    return {kfp_name(k): v for k, v in flatten(params).items()}


def encode(values: Mapping[str, Any], sections: Iterable[str] | None = None) -> str:
    """`key=value` records for the keys of `sections` (all when None); `values` maps kfp
    names to pipeline parameters (channels at compile time) or plain values."""
    wanted = None if sections is None else set(sections)
    return SEP.join(f"{key}={values[kfp_name(key)]}" for key in _keys()
                    if wanted is None or key.split(".", 1)[0] in wanted)


def _parse(key: str, default: Any, raw: str) -> Any:
    """`raw` as the type of `default`; unparseable text is returned as is, for the config
    validation to reject with the key's name."""
    if isinstance(default, bool):
        low = raw.strip().lower()
        return {"true": True, "false": False}.get(low, raw)
    if isinstance(default, int):
        try:
            number = float(raw)
        except ValueError:
            return raw
        return int(number) if number.is_integer() else number
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            return raw
    if isinstance(default, list):
        try:
            return json.loads(raw)
        except ValueError:
            try:
                return yaml.safe_load(raw)
            except yaml.YAMLError:
                return raw
    return raw


def decode(text: str) -> Params:
    """The `Params` a component runs with: `encode`'s records, parsed and validated; keys
    of sections not sent keep their defaults."""
    defaults = _keys()
    data: dict[str, dict[str, Any]] = {}
    for record in text.split(SEP) if text else []:
        key, sep, raw = record.partition("=")
        if not sep or key not in defaults:
            raise ConfigError(f"pipeline params: unknown record {record[:60]!r}")
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = _parse(key, defaults[key], raw)
    return params_from_dict(data)
