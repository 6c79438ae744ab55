"""params.yaml loading: sections, overrides, and one-line errors naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from cnnflow.config import Params, flatten, load_params, params_from_dict, to_dict
from cnnflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_repo_params_yaml_lists_every_field_once():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    defaults = to_dict(Params())
    assert set(raw) == set(defaults)
    for section, values in defaults.items():
        assert set(raw[section]) == set(values), section
    load_params(ROOT / "params.yaml")


def test_overrides_are_typed_by_yaml_and_applied():
    p = load_params(None, ["prepare.seed=3", "optim.lr=0.05", "train.flip=true",
                           "optim.betas=[0.8, 0.9]", "prepare.path=some dir"])
    assert p.prepare.seed == 3
    assert p.optim.lr == 0.05
    assert p.train.flip is True
    assert p.optim.betas == [0.8, 0.9]
    assert p.prepare.path == "some dir"


def test_int_is_accepted_for_a_float_field_but_not_the_reverse():
    assert load_params(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"^prepare\.seed: expected an int, got 1\.5$"):
        load_params(None, ["prepare.seed=1.5"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("prepare.bogus=1", r"^prepare\.bogus: unknown key; expected one of .*seed"),
        ("nosuch.key=1", r"unknown section 'nosuch'"),
        ("prepare.seed=abc", r"^prepare\.seed: expected an int, got 'abc'$"),
        ("train.flip=maybe", r"^train\.flip: expected true or false, got 'maybe'$"),
        ("prepare.source=mnist", r"^prepare\.source: expected one of 'digits'.*got 'mnist'$"),
        ("prepare.train_ratio=0.9", r"sum of 1, got 1\.1"),
        ("prepare.channels=2", r"^prepare\.channels: expected 0, 1 or 3, got 2$"),
        ("optim.lr=-1", r"^optim\.lr: expected a number > 0, got -1\.0$"),
        ("train.batch_size=0", r"^train\.batch_size: expected an int >= 1, got 0$"),
        ("prepare.seed", r"expected section\.key=value"),
        ("prepare.source=idx", r"^prepare\.path: expected the input path for source 'idx'"),
    ],
)
def test_bad_values_name_the_key_in_one_line(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_params(None, [override])
    assert "\n" not in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("prepare:\n  seed: [1\n")
    with pytest.raises(ConfigError, match=r"params\.yaml line \d+: not valid YAML"):
        load_params(bad)
    bad.write_text("prepare:\n  seed: x\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: prepare\.seed: expected an int"):
        load_params(bad)
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"^prepare: expected a mapping"):
        params_from_dict({"prepare": 3})


def test_flatten_covers_every_field_with_dotted_keys():
    flat = flatten(Params())
    count = sum(len(dataclasses.fields(type(getattr(Params(), f.name))))
                for f in dataclasses.fields(Params))
    assert len(flat) == count
    assert flat["prepare.seed"] == 0 and "train.batch_size" in flat


def test_params_yaml_values_are_the_dataclass_defaults():
    """params.yaml documents the defaults: the KFP pipeline's parameter defaults (from the
    dataclasses) and a bare `cnnflow` run agree. Two keys differ on purpose: the raw
    input path (the package copy of digits needs no file) and the processes per pod (one
    per pod on a cluster, where replicas scale; two on this machine's two cores)."""
    from_file = flatten(load_params(ROOT / "params.yaml"))
    defaults = flatten(Params())
    differ = {k for k in defaults if from_file[k] != defaults[k]}
    assert differ == {"prepare.path", "launch.nproc_per_node"}, {
        k: (from_file[k], defaults[k]) for k in differ}
