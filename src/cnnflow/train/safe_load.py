"""Read checkpoints without running code from them.

A checkpoint directory is user-writable (a shared volume, a copied run), and resume is
automatic: the newest `step-*.pt` in checkpoint.dir is loaded by itself. So nothing here
unpickles arbitrary objects:

- checkpoint files and `meta.pt` load with `torch.load(weights_only=True)`: tensors and
  plain data (dicts, lists, tuples, str, int, float, bool, None). The payload is written
  that way (`cnnflow.train.checkpoint.rng_state` turns the numpy and python RNG states
  into plain data). Anything else is refused with one line naming the file.
- a DCP directory's `.metadata` is a plain pickle that torch.distributed.checkpoint
  loads with `pickle.load`, and its non-tensor items with `torch.load(weights_only=False)`;
  `SafeReader` and `SafePlanner` read both with an allow-list (the DCP metadata classes,
  torch dtypes and sizes) and `weights_only=True` instead.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from cnnflow import storage
from cnnflow.errors import CnnflowError


class UnsafeCheckpointError(CnnflowError):
    """A checkpoint holds objects that loading would construct (and so run code of)."""


def refused(path: Path, exc: Exception) -> CnnflowError:
    """The one-line error for a checkpoint that did not load: one that names an object
    to construct (a pickle GLOBAL) is refused as such, anything else is unreadable."""
    lines = str(exc).splitlines() if isinstance(exc, pickle.UnpicklingError) else []
    named = next((ln.strip() for ln in lines if "GLOBAL" in ln), "")
    if named:
        return UnsafeCheckpointError(
            f"{path}: refused: not a plain-tensor checkpoint (loading it would construct "
            f"pickled objects, which can run code: {named[:160]}); remove it or set "
            "checkpoint.fresh=true")
    return CnnflowError(f"{path}: not a readable checkpoint ({type(exc).__name__})")


def load_plain(source: Path | IO[bytes], name: Any = None) -> dict[str, Any]:
    """A checkpoint file (a path, or an object's bytes named `name`) of tensors and plain
    data, or a one-line error naming it."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # a crafted, truncated or foreign file
        raise refused(name if name is not None else source, exc) from None


_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_DCP_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
              ("torch", "Size"), ("torch.serialization", "_get_layout"),
              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
              ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """The Python documentation's "restricting globals": only DCP's own metadata."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_NAMES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module in _DCP_MODULES:  # the classes defined there, not what it imports
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


class _SafeMetadata:
    """A DCP reader's read_metadata through the allow-list (mixed into a StorageReader)."""

    def _metadata_file(self) -> tuple[Any, IO[bytes]]:
        path = Path(self.path) / ".metadata"
        return path, open(path, "rb")  # noqa: SIM115 (closed by the caller)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = "?"
        try:
            path, f = self._metadata_file()
            with f:
                metadata = _MetadataUnpickler(f).load()
        except Exception as exc:
            raise refused(path, exc) from None
        if not isinstance(metadata, Metadata):
            raise refused(path, pickle.UnpicklingError("not DCP metadata"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeReader(_SafeMetadata, FileSystemReader):
    """FileSystemReader whose `.metadata` may name DCP's metadata classes only."""


def safe_reader(path: str | Path) -> Any:
    """The safe DCP reader for a directory, or for an object storage prefix (DCP's
    FsspecReader with the same allow-list; the `.metadata` object read through storage)."""
    if not storage.is_remote(path):
        return SafeReader(path)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    class SafeFsspecReader(_SafeMetadata, FsspecReader):
        def _metadata_file(self) -> tuple[Any, IO[bytes]]:
            uri = storage.join(str(path), ".metadata")
            return uri, io.BytesIO(storage.read_bytes(uri))

    return SafeFsspecReader(str(path), **storage.fs_options(str(path)))


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items load with weights_only=True."""

    def __init__(self, directory: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.directory = directory

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as exc:
            raise refused(Path(self.directory) / f"[{fqn}]", exc) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
