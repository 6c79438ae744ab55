"""The CLI as a user runs it: `cnnflow --version`, and bad values named by where they
came from (README, Configuration)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from tests.cli import cnnflow

ROOT = Path(__file__).resolve().parents[2]


def test_version_is_the_package_version(tmp_path):
    done = cnnflow("--version", cwd=tmp_path)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert done.returncode == 0 and done.stdout == f"cnnflow {version}\n"


def test_a_bad_value_names_its_origin_in_one_line(tmp_path):
    done = cnnflow("train", "--set", "optim.lr=abc", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == "cnnflow: error: --set optim.lr: expected a number, got 'abc'\n"
    (tmp_path / "params.yaml").write_text("prepare:\n  seed: abc\n")
    done = cnnflow("prepare", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == "cnnflow: error: params.yaml: prepare.seed: expected an int, got 'abc'\n"
    assert not (tmp_path / "data").exists()


def test_a_mount_without_a_directory_is_one_line(tmp_path):
    done = cnnflow("launch", "render", "--mount", "/job", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == ("cnnflow: error: --mount '/job': expected mountPath=DIR, e.g. "
                           "--mount /workspace=.\n")
