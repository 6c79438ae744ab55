"""Sources: each format read from small files made here, and each bad input refused."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnflow.config import PrepareConfig
from cnnflow.data.sources import open_source
from cnnflow.data.sources.digits import to_uint8
from cnnflow.data.sources.synthetic import generate_chunk, synthetic_labels
from cnnflow.errors import CnnflowError, ConfigError, DataError
from tests.cli import cnnflow


def read_all(data) -> np.ndarray:
    return np.concatenate(list(data.read_chunks()))


def one_line_error(exc_type, func, *names: str) -> str:
    with pytest.raises(exc_type) as info:
        func()
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message
    return message


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = False) -> Path:
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(raw)
    return path


def make_idx(directory: Path, prefix: str, n: int, gz: bool = False, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    images = rng.integers(0, 256, (n, 4, 5), dtype=np.uint8)
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x803, gz)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 3, 0x801, gz)


def make_cifar(directory: Path, sizes=(4, 3), test: int = 2) -> np.ndarray:
    """Batches whose pixels encode (image, channel); returns the expected (N,32,32,3)."""
    directory.mkdir(exist_ok=True)
    with (directory / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [b"cat", b"dog", b"frog"]}, f)
    expected, start = [], 0
    names = [f"data_batch_{i + 1}" for i in range(len(sizes))] + ["test_batch"]
    for name, n in zip(names, (*sizes, test), strict=True):
        hwc = np.zeros((n, 32, 32, 3), dtype=np.uint8)
        hwc[:] = (np.arange(start, start + n) * 7)[:, None, None, None] % 250
        hwc[..., 1] += 1
        hwc[..., 2] += 2
        hwc[:, 0, 1, :] = 255  # one marked pixel: checks the row/column order
        planar = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)
        with (directory / name).open("wb") as f:
            pickle.dump({b"data": planar, b"labels": [i % 3 for i in range(n)]}, f)
        expected.append(hwc)
        start += n
    return np.concatenate(expected)


def cfg(**kw) -> PrepareConfig:
    return PrepareConfig(**kw)


# ---------------------------------------------------------------------------- digits


def test_digits_scaling_is_integer_round_half_up():
    assert to_uint8(np.array([0, 1, 8, 15, 16])).tolist() == [0, 16, 128, 239, 255]


def test_digits_native_shape_and_classes(tmp_path):
    data = open_source(cfg(), tmp_path)
    images = read_all(data)
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert data.classes == [str(d) for d in range(10)]
    assert images.max() == 255 and len(data.labels) == 1797


@pytest.mark.parametrize("key", ["height", "width", "channels"])
def test_digits_rejects_other_sizes(tmp_path, key):
    value = 3 if key == "channels" else 16
    one_line_error(
        ConfigError, lambda: open_source(cfg(**{key: value}), tmp_path), f"prepare.{key}"
    )
    open_source(cfg(**{key: 1 if key == "channels" else 8}), tmp_path)


# ------------------------------------------------------------------------- synthetic


def test_synthetic_labels_balanced_and_seeded():
    labels = synthetic_labels(0, 103, 10)
    assert np.bincount(labels).tolist() == [11, 11, 11] + [10] * 7
    assert not np.array_equal(labels, synthetic_labels(1, 103, 10))


def test_synthetic_shape_and_workers_do_not_change_pixels(tmp_path):
    base = dict(source="synthetic", num_images=1000, height=128, width=96, channels=3)
    one = open_source(cfg(**base, workers=1), tmp_path)
    two = open_source(cfg(**base, workers=2), tmp_path)
    a, b = read_all(one), read_all(two)
    assert a.shape == (1000, 128, 96, 3) and a.dtype == np.uint8
    assert len(list(one.read_chunks())) > 1  # several chunks, so the test means something
    assert np.array_equal(a, b)
    assert one.classes[0] == "0" and len(one.classes) == 10


def test_synthetic_classes_are_learnable_but_noisy():
    labels = synthetic_labels(0, 4000, 10)
    images = generate_chunk((0, 10, (16, 16, 3), 0, labels)).reshape(4000, -1).astype(float)
    train, test = slice(0, 3000), slice(3000, None)
    means = np.stack([images[train][labels[train] == k].mean(0) for k in range(10)])
    dist = ((images[test][:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = (dist.argmin(1) == labels[test]).mean()
    assert accuracy > 0.5  # structure a simple model can find
    same_class = images[labels == 0]
    assert same_class.std(0).mean() > 10  # images of one class are not copies


# ----------------------------------------------------------------------- imagefolder


def make_folder(root: Path) -> None:
    for name, color in (("b_dog", (0, 200, 0)), ("a_cat", (200, 0, 0))):
        (root / name / "sub").mkdir(parents=True)
        Image.new("RGB", (40, 20), color).save(root / name / "x.png")
        Image.new("RGB", (8, 8), color).save(root / name / "sub" / "y.jpg", quality=95)
        Image.new("L", (32, 32), 77).save(root / name / "a.jpeg")
    (root / "a_cat" / ".hidden").write_text("ignored")
    (root / "README.txt").write_text("files in root are ignored")


def test_imagefolder_reads_resizes_and_orders(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root)
    data = open_source(cfg(source="imagefolder", path=str(root), height=6, width=10), tmp_path)
    images = read_all(data)
    assert data.classes == ["a_cat", "b_dog"]
    assert images.shape == (6, 6, 10, 3)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # sorted relative paths: a.jpeg (gray 77), sub/y.jpg, x.png
    assert np.all(images[0] == 77)
    assert tuple(images[2, 3, 5]) == (200, 0, 0)
    assert abs(int(images[4, 3, 5, 1]) - 200) <= 3  # JPEG: lossy
    gray = open_source(cfg(source="imagefolder", path=str(root), channels=1, workers=1), tmp_path)
    assert read_all(gray).shape == (6, 32, 32, 1)
    assert data.extra == {"skipped": []}


def test_imagefolder_non_image_and_corrupt_files(tmp_path, caplog):
    root = tmp_path / "imgs"
    make_folder(root)
    (root / "a_cat" / "notes.txt").write_text("hello")
    options = dict(source="imagefolder", path=str(root))
    one_line_error(DataError, lambda: open_source(cfg(**options), tmp_path), "notes.txt")
    (root / "a_cat" / "notes.txt").unlink()
    good = (root / "b_dog" / "x.png").read_bytes()
    (root / "b_dog" / "x.png").write_bytes(good[: len(good) // 2])  # truncated
    one_line_error(DataError, lambda: open_source(cfg(**options), tmp_path), "x.png", "corrupt")
    (root / "a_cat" / "z.png").write_bytes(b"not a png at all")
    with caplog.at_level(logging.WARNING, logger="cnnflow"):
        data = open_source(cfg(**options, skip_corrupt=True), tmp_path)
    assert data.extra["skipped"] == ["a_cat/z.png", "b_dog/x.png"]
    assert len(read_all(data)) == len(data.labels) == 5
    assert "skipped 2" in caplog.text


def test_imagefolder_empty_class_and_missing_path(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root)
    (root / "c_empty").mkdir()
    options = dict(source="imagefolder", path=str(root))
    one_line_error(DataError, lambda: open_source(cfg(**options), tmp_path), "c_empty")
    missing = str(tmp_path / "nope")
    one_line_error(
        DataError, lambda: open_source(cfg(source="imagefolder", path=missing), tmp_path), missing
    )


def test_imagefolder_class_with_only_corrupt_files(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root)
    (root / "c_bad").mkdir()
    (root / "c_bad" / "bad.png").write_bytes(b"junk")
    options = dict(source="imagefolder", path=str(root), skip_corrupt=True)
    one_line_error(DataError, lambda: open_source(cfg(**options), tmp_path), "c_bad")


# ------------------------------------------------------------------------------- idx


def test_idx_plain_and_gzip_pairs_concatenate_in_prefix_order(tmp_path):
    make_idx(tmp_path, "train", 6, gz=True, seed=1)
    make_idx(tmp_path, "t10k", 3, gz=False, seed=2)
    data = open_source(cfg(source="idx", path=str(tmp_path)), tmp_path)
    images = read_all(data)
    assert images.shape == (9, 4, 5, 1)
    first = np.random.default_rng(2).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    assert np.array_equal(images[:3, ..., 0], first)  # t10k sorts before train
    assert data.classes == ["0", "1", "2"]
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    one_line_error(
        ConfigError,
        lambda: open_source(cfg(source="idx", path=str(tmp_path), width=28), tmp_path),
        "prepare.width",
    )


def test_idx_bad_files(tmp_path):
    make_idx(tmp_path, "train", 5)
    labels = tmp_path / "train-labels-idx1-ubyte"
    options = dict(source="idx", path=str(tmp_path))
    write_idx(labels, np.arange(4) % 3, 0x801)
    one_line_error(DataError, lambda: open_source(cfg(**options), tmp_path), labels.name, "4")
    write_idx(labels, np.arange(5) % 3, 0x803)
    one_line_error(DataError, lambda: open_source(cfg(**options), tmp_path), labels.name, "magic")
    write_idx(labels, np.arange(5) % 3, 0x801)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-7])
    one_line_error(DataError, lambda: open_source(cfg(**options), tmp_path), images.name)
    images.unlink()
    fake = tmp_path / "train-images-idx3-ubyte.gz"
    fake.write_bytes(b"plain bytes, not gzip")
    one_line_error(DataError, lambda: open_source(cfg(**options), tmp_path), fake.name, "gzip")
    fake.unlink()
    one_line_error(DataError, lambda: open_source(cfg(**options), tmp_path), labels.name)


def test_idx_directory_without_idx_files(tmp_path):
    one_line_error(DataError, lambda: open_source(cfg(source="idx", path=str(tmp_path)), tmp_path))


# ----------------------------------------------------------------------------- cifar


def test_cifar_batches_in_order_and_hwc(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    expected = make_cifar(directory, sizes=(4, 3) + (1,) * 8)  # data_batch_10 after _9
    data = open_source(cfg(source="cifar", path=str(directory)), tmp_path)
    assert data.classes == ["cat", "dog", "frog"]
    assert np.array_equal(read_all(data), expected)


def test_cifar_bad_batches(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    make_cifar(directory)
    options = dict(source="cifar", path=str(directory))
    with (directory / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 0, 0]}, f)
    one_line_error(
        DataError, lambda: open_source(cfg(**options), tmp_path), "data_batch_2", "(N, 3072)"
    )
    (directory / "data_batch_2").write_bytes(b"\x80\x04junk")
    one_line_error(DataError, lambda: open_source(cfg(**options), tmp_path), "data_batch_2")
    (directory / "data_batch_2").unlink()
    (directory / "batches.meta").unlink()
    one_line_error(DataError, lambda: open_source(cfg(**options), tmp_path), "batches.meta")
    one_line_error(
        ConfigError, lambda: open_source(cfg(**options, channels=1), tmp_path), "prepare.channels"
    )


def test_cifar_batches_of_other_picklers_load(tmp_path):
    """Protocol 2 (bytes as _codecs.encode) and numpy 1.x's module name (numpy.core, as in
    the official Python 2 files) rebuild the same arrays through the allow-list."""
    directory = tmp_path / "cifar-10-batches-py"
    expected = make_cifar(directory)
    for path in directory.iterdir():
        raw = pickle.dumps(pickle.loads(path.read_bytes()), protocol=2)
        assert b"_codecs" in raw or path.name == "batches.meta"
        path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"cnumpy.core.multiarray\n" in (directory / "test_batch").read_bytes()
    data = open_source(cfg(source="cifar", path=str(directory)), tmp_path)
    assert np.array_equal(read_all(data), expected)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_cifar_batch_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    make_cifar(directory)
    marker = tmp_path / "ran"
    with (directory / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": _Payload(marker), b"labels": [0]}, f)
    done = cnnflow("prepare", "--set", "prepare.source=cifar", "--set",
                   f"prepare.path={directory}", "--set", f"prepare.out_dir={tmp_path / 'out'}",
                   "--set", "tracking.enabled=false", cwd=tmp_path)
    assert done.returncode != 0 and not marker.exists()
    assert done.stderr.splitlines() == [
        f"cnnflow: error: {directory / 'data_batch_2'}: refused: the pickle calls "
        f"{os.system.__module__}.system, which a CIFAR batch never holds (unpickling it "
        "would run code)"]
    assert not (tmp_path / "out").exists()


def test_every_error_is_a_cnnflow_error():
    assert issubclass(DataError, CnnflowError) and issubclass(ConfigError, CnnflowError)
