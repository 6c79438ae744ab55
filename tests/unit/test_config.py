"""params.yaml loading: sections, overrides, and one-line errors naming the origin and key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
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
    with pytest.raises(ConfigError, match=r"^--set prepare\.seed: expected an int, got 1\.5$"):
        load_params(None, ["prepare.seed=1.5"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("prepare.bogus=1", r"^--set prepare\.bogus: unknown key; expected one of .*seed"),
        ("nosuch.key=1", r"^--set nosuch\.key: unknown section 'nosuch'"),
        ("prepare.seed=abc", r"^--set prepare\.seed: expected an int, got 'abc'$"),
        ("train.flip=maybe", r"^--set train\.flip: expected true or false, got 'maybe'$"),
        ("prepare.source=mnist", r"^--set prepare\.source: expected one of 'digits'.*got 'mnist'$"),
        ("prepare.train_ratio=0.9", r"^--set prepare\.train_ratio\+.*sum of 1, got 1\.1$"),
        ("prepare.channels=2", r"^--set prepare\.channels: expected 0, 1 or 3, got 2$"),
        ("optim.lr=-1", r"^--set optim\.lr: expected a number > 0, got -1\.0$"),
        ("train.batch_size=0", r"^--set train\.batch_size: expected an int >= 1, got 0$"),
        ("prepare.seed", r"^--set 'prepare\.seed': expected section\.key=value"),
        ("optim.betas=[0.9, x]", r"^--set optim\.betas\[1\]: expected a number, got 'x'$"),
        ("launch.elastic_min_nodes=2", r"^--set launch\.elastic_min_nodes/elastic_max_nodes:"),
        # The key at fault was set by nobody (its default): no origin to name.
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


def _error(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_params(path, overrides)
    return str(info.value)


def test_errors_name_the_origin_of_the_bad_value(tmp_path, monkeypatch):
    """A value from `--set` is named as such even when a params file was read too; a value
    from the file is named by the file's path as given."""
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("optim:\n  lr: 0.5\n")
    assert _error("params.yaml", ["optim.lr=abc"]) == "--set optim.lr: expected a number, got 'abc'"
    assert _error(None, ["optim.lr=abc"]) == "--set optim.lr: expected a number, got 'abc'"
    assert _error("params.yaml", ["optim.lr=-1"]) == (
        "--set optim.lr: expected a number > 0, got -1.0")
    Path("params.yaml").write_text("optim:\n  lr: abc\n")
    assert _error("params.yaml") == "params.yaml: optim.lr: expected a number, got 'abc'"
    assert _error(tmp_path / "params.yaml") == (
        f"{tmp_path / 'params.yaml'}: optim.lr: expected a number, got 'abc'")
    assert load_params("params.yaml", ["optim.lr=0.2"]).optim.lr == 0.2  # the override wins
    Path("params.yaml").write_text("optim:\n  lr: -1\n")
    assert _error("params.yaml", ["optim.momentum=0.5"]) == (
        "params.yaml: optim.lr: expected a number > 0, got -1.0")


def test_origin_of_errors_over_several_keys_or_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("prepare:\n  train_ratio: 0.8\n  bogus: 1\n")
    assert _error("params.yaml") == (
        "params.yaml: prepare.bogus: unknown key; expected one of channels, height, "
        "num_classes, num_images, out_dir, path, seed, skip_corrupt, source, test_ratio, "
        "train_ratio, val_ratio, width, workers")
    Path("params.yaml").write_text("prepare:\n  train_ratio: 0.8\n")
    assert _error("params.yaml", ["prepare.val_ratio=0.3"]) == (
        "--set prepare.train_ratio+val_ratio+test_ratio: expected a sum of 1, got 1.2")
    # prepare.path keeps its default: the file is where it is missing.
    assert _error("params.yaml", ["prepare.source=idx"]) == (
        "params.yaml: prepare.path: expected the input path for source 'idx', got ''")
    assert _error("params.yaml", ["prepare.seed"]) == (
        "--set 'prepare.seed': expected section.key=value")


def test_loading_params_does_not_import_torch():
    """prepare and shard run without torch; the config modules must not pull it in."""
    code = "import sys, cnnflow.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


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
