"""Per-rank training batches drawn from a fixed number of data streams.

The global batch of each step is assembled from `streams` equal parts, one per stream;
stream v is the shard loader of "virtual rank" v of `streams`. A rank owns
streams / world_size of them. So with streams = 4 the global batches, and therefore the
losses, are the same whether 1, 2 or 4 processes train (world-size invariance), and each
rank still reads only its own streams' shards.

`open_shards` reads the shard set's manifest once (`ShardSet`: version, normalisation,
image shape, classes, val batches); `train_streams` builds a rank's `StreamBatches`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cnnflow.config import TrainConfig
from cnnflow.data.loader import build_loader, normalize_batch
from cnnflow.errors import CnnflowError, ConfigError
from cnnflow.train.loop import augment


def plan_streams(global_batch: int, grad_accum: int, world_size: int, streams: int) -> int:
    """Samples per stream per micro-batch; raises ConfigError when it does not divide."""
    streams = streams or world_size
    if streams % world_size:
        raise ConfigError(
            f"train.streams={streams}: expected a multiple of the data-parallel world size "
            f"{world_size}"
        )
    per_stream, rest = divmod(global_batch, streams * grad_accum)
    if rest or per_stream == 0:
        raise ConfigError(
            f"train.batch_size={global_batch}: expected a multiple of streams x grad_accum = "
            f"{streams} x {grad_accum} = {streams * grad_accum} (world size {world_size})"
        )
    return per_stream


class StreamBatches:
    """Micro-batches for one rank: its streams' loaders zipped and concatenated."""

    def __init__(self, shards: str, *, global_batch: int, grad_accum: int, rank: int,
                 world_size: int, streams: int, seed: int, num_workers: int,
                 expected_version: str | None, mean, std, augment_images: bool,
                 flip: bool) -> None:
        self.streams = streams or world_size
        per_stream = plan_streams(global_batch, grad_accum, world_size, self.streams)
        own = self.streams // world_size
        self.stream_ids = list(range(rank * own, (rank + 1) * own))
        self.loaders = [
            build_loader(shards, "train", batch_size=per_stream, rank=v,
                         world_size=self.streams, seed=seed, num_workers=num_workers,
                         expected_version=expected_version, verify=(i == 0), shuffle=True,
                         drop_last=True)
            for i, v in enumerate(self.stream_ids)
        ]
        self.grad_accum = grad_accum
        self.seed = seed
        self.mean, self.std = mean, std
        self.augment_images, self.flip = augment_images, flip
        self.manifest = self.loaders[0].manifest

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loaders[0]) // self.grad_accum

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[tuple]]:
        """Yield, per optimizer step, the list of `grad_accum` (images, labels) pairs.

        A stream's samples of one step are augmented together, from one generator seeded
        by (seed, epoch, step, stream), then cut into the micro-batches: so `grad_accum`
        changes how a step is split, never what it holds (nor its augmentation)."""
        for loader in self.loaders:
            loader.set_epoch(epoch, start_batch=start_step * self.grad_accum)
        iters = [iter(loader) for loader in self.loaders]
        for step in range(start_step, self.steps_per_epoch):
            streams = [self._stream_step(it, epoch, step, v)
                       for v, it in zip(self.stream_ids, iters, strict=True)]
            micro = []
            for m in range(self.grad_accum):
                parts_x = [images[m] for images, _ in streams]
                parts_y = [labels[m] for _, labels in streams]
                x = torch.cat(parts_x) if len(parts_x) > 1 else parts_x[0]
                y = torch.cat(parts_y) if len(parts_y) > 1 else parts_y[0]
                micro.append((normalize_batch(x, self.mean, self.std), y))
            yield micro

    def _stream_step(self, it, epoch: int, step: int, stream: int) -> tuple[list, list]:
        """One stream's `grad_accum` batches of a step, augmented as one: (images, labels)
        per micro-batch."""
        batches = [next(it) for _ in range(self.grad_accum)]
        if not self.augment_images:
            return [b[0] for b in batches], [b[1] for b in batches]
        images = torch.cat([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
        key = np.random.SeedSequence([self.seed, epoch, step, 0, stream])
        gen = torch.Generator().manual_seed(int(key.generate_state(1)[0]))
        images = augment(images, gen, self.flip)
        sizes = [len(b[0]) for b in batches]
        return list(torch.split(images, sizes)), [b[1] for b in batches]


def eval_batches(shards: str, split: str, *, batch_size: int, rank: int, world_size: int,
                 mean, std, expected_version: str | None):
    """Normalised (images, labels) of `split` for this rank, in order, nothing dropped
    beyond the split's remainder over ranks."""
    loader = build_loader(shards, split, batch_size=batch_size, rank=rank,
                          world_size=world_size, seed=0, shuffle=False, drop_last=False,
                          expected_version=expected_version, verify=False)
    for images, labels in loader:
        yield normalize_batch(images, mean, std), labels


@dataclass(frozen=True)
class ShardSet:
    """The shard directory a run trains on and its manifest."""

    path: str
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return self.manifest["dataset_version"]

    @property
    def norm(self) -> dict[str, list[float]]:
        return self.manifest["normalize"]

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    def model_meta(self, model_config: dict) -> dict[str, Any]:
        """model.json: the model config and what the data looked like to it."""
        m = self.manifest
        return {"model": model_config, "dataset_version": m["dataset_version"],
                "classes": m["classes"], "image_shape": m["image_shape"],
                "normalize": m["normalize"]}

    def val_batches(self, rank: int, world_size: int):
        """This data rank's share of the val split, normalised, 256 images a batch."""
        return eval_batches(self.path, "val", batch_size=256, rank=rank,
                            world_size=world_size, mean=self.norm["mean"],
                            std=self.norm["std"], expected_version=self.version)


def open_shards(path: str, expected_version: str = "") -> ShardSet:
    """The shard set at `path`; CnnflowError when `train.dataset_version` is set and the
    shards hold another version."""
    from cnnflow.data.manifest import verify_shards

    shards = ShardSet(path, verify_shards(path, splits=["val"]))  # train: StreamBatches
    if expected_version and expected_version != shards.version:
        raise CnnflowError(
            f"train.dataset_version={expected_version[:12]}: the shards in {path} hold "
            f"dataset version {shards.version[:12]}; re-run prepare and shard, or change the "
            "setting"
        )
    return shards


def train_streams(shards: ShardSet, tc: TrainConfig, *, rank: int, world_size: int
                  ) -> StreamBatches:
    """Data rank `rank` of `world_size`'s training micro-batches; CnnflowError when an
    epoch would hold no step."""
    norm = shards.norm
    data = StreamBatches(
        shards.path, global_batch=tc.batch_size, grad_accum=tc.grad_accum, rank=rank,
        world_size=world_size, streams=tc.streams, seed=tc.seed,
        num_workers=tc.loader_workers, expected_version=shards.version, mean=norm["mean"],
        std=norm["std"], augment_images=tc.augment, flip=tc.flip,
    )
    if data.steps_per_epoch < 1:
        raise CnnflowError(
            f"train.batch_size={tc.batch_size}: larger than the {data.loaders[0].samples_per_rank}"
            f" training samples per stream; lower it or use fewer streams"
        )
    return data
