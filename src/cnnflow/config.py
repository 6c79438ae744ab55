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
from cnnflow.errors import check_config as _check
from cnnflow.launch.config import LaunchConfig

SOURCES = ("digits", "synthetic", "imagefolder", "idx", "cifar")


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
        _check(self.seed >= 0, "prepare.seed", "an int >= 0", self.seed)
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
    samples_per_shard: int = 256
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
    """Channels of the first stage (0 = the model's default: 64 small_cnn, 16 resnet20/56,
    64 resnet18). Later stages double it."""
    depth: int = 0
    """small_cnn: conv blocks (0 = 2). resnet: 0 keeps the name's depth (20/56/18)."""
    norm: Literal["batch", "syncbatch", "group"] = "batch"
    """batch = BatchNorm (per-rank statistics), syncbatch = SyncBatchNorm across ranks,
    group = GroupNorm (no cross-sample statistics: world-size invariant)."""
    groups: int = 8
    """GroupNorm groups (norm=group); must divide every stage's channel count."""
    dropout: float = 0.2
    """Dropout before the classifier, in [0, 1)."""

    def __post_init__(self) -> None:
        _check(0 <= self.width <= 4096, "model.width", "0 (default) or 1..4096", self.width)
        _check(0 <= self.depth <= 64, "model.depth", "0 (default) or 1..64", self.depth)
        _check(self.groups >= 1, "model.groups", "an int >= 1", self.groups)
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "a number in [0, 1)", self.dropout)


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallelism as degrees: dp x pp x fsdp = world size."""

    dp: int = 0
    """Data-parallel replicas (0 = world size / (pp x fsdp))."""
    pp: int = 1
    """Pipeline stages (model parallel)."""
    fsdp: int = 1
    """Fully-sharded data-parallel degree (ZeRO-3: parameters, gradients and optimizer
    state split over this many ranks). With dp > 1 too: HSDP, replicas of a sharded model."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved1f1b"] = "1f1b"
    """Pipeline schedule (pp > 1). gpipe: all forwards, then all backwards (activations of
    every micro-batch alive at once); 1f1b: same bubble, at most pp micro-batches of
    activations; interleaved1f1b: 2 stages per rank, bubble roughly halved."""
    microbatches: int = 0
    """Micro-batches per pipeline step (0 = 2 x the number of stages). Must divide the
    per-replica batch train.batch_size / (dp x grad_accum). Bubble = (K-1)/(M+K-1) for K
    stages per replica: more micro-batches, smaller bubble, smaller (slower) kernels."""
    split_points: list[str] = field(default_factory=list)
    """Blocks that start a new pipeline stage (names from `pipeline_blocks`, e.g.
    ['stage2.0'] for 2 stages); [] = balance automatically (see pp_balance)."""
    pp_balance: Literal["flops", "params"] = "flops"
    """Automatic split: equalise measured forward FLOPs (speed) or parameter counts
    (memory) over the stages."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto = nccl on CUDA, gloo on CPU."""
    init_timeout_s: float = 60.0
    """Seconds to wait for MASTER_ADDR:MASTER_PORT and every rank before failing."""
    bucket_mb: float = 25.0
    """DDP gradient bucket in MiB (25 = DDP's default; smaller buckets start all-reduce
    earlier in backward but cost more calls)."""
    comm_hook: Literal["none", "bf16", "fp16", "powersgd"] = "none"
    """DDP communication hook: compress gradients to bf16/fp16, or PowerSGD low-rank."""
    powersgd_rank: int = 1
    """PowerSGD matrix approximation rank (1-4 is typical)."""
    powersgd_start_step: int = 10
    """Plain all-reduce for this many steps before PowerSGD starts (warm start)."""
    local_sgd_period: int = 0
    """Local SGD: 0 = off; k >= 1 = ranks step independently and average parameters
    every k steps (no gradient all-reduce in between)."""
    local_sgd_start_step: int = 0
    """Steps of ordinary DDP before local SGD starts."""

    def __post_init__(self) -> None:
        for name in ("dp", "pp", "fsdp"):
            value = getattr(self, name)
            low = 0 if name == "dp" else 1
            _check(value >= low, f"parallel.{name}", f"an int >= {low}", value)
        _check(self.init_timeout_s > 0, "parallel.init_timeout_s", "> 0 seconds",
               self.init_timeout_s)
        _check(self.bucket_mb > 0, "parallel.bucket_mb", "> 0 MiB", self.bucket_mb)
        _check(self.powersgd_rank >= 1, "parallel.powersgd_rank", "an int >= 1",
               self.powersgd_rank)
        _check(self.powersgd_start_step >= 0, "parallel.powersgd_start_step", "an int >= 0",
               self.powersgd_start_step)
        _check(self.local_sgd_period >= 0, "parallel.local_sgd_period", "an int >= 0",
               self.local_sgd_period)
        _check(self.local_sgd_start_step >= 0, "parallel.local_sgd_start_step",
               "an int >= 0", self.local_sgd_start_step)
        _check(self.microbatches >= 0, "parallel.microbatches", "an int >= 0 (0 = auto)",
               self.microbatches)
        _check(len(set(self.split_points)) == len(self.split_points), "parallel.split_points",
               "distinct block names", self.split_points)
        _check(not self.split_points or len(self.split_points) == self.stages - 1,
               "parallel.split_points", f"{self.stages - 1} block names (one per stage after "
               f"the first: parallel.pp={self.pp}, schedule {self.pp_schedule!r}) or []",
               self.split_points)
        _check(not (self.local_sgd_period and self.comm_hook != "none"),
               "parallel.comm_hook", "'none' when parallel.local_sgd_period > 0",
               self.comm_hook)

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages one rank holds: 2 for the interleaved schedule, else 1."""
        return 2 if self.pp_schedule == "interleaved1f1b" and self.pp > 1 else 1

    @property
    def stages(self) -> int:
        """Pipeline stages per replica (1 without pipeline parallelism)."""
        return self.pp * self.stages_per_rank


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    """Peak learning rate for the reference batch `base_batch_size` (see scale_lr)."""
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    scale_lr: bool = False
    """Linear scaling rule (Goyal et al. 2017): lr x global_batch / base_batch_size."""
    base_batch_size: int = 256
    warmup_steps: int = 0
    """Linear warmup from lr/10 to the peak over this many steps (Goyal et al.: ~5 epochs
    when scaling lr to large batches)."""
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_epochs: int = 30
    """schedule=step: multiply lr by `gamma` every this many epochs."""
    gamma: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "a number > 0", self.lr)
        _check(0 <= self.momentum < 1, "optim.momentum", "a number in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, "optim.weight_decay", "a number >= 0",
               self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               "two numbers in [0, 1)", self.betas)
        _check(self.base_batch_size >= 1, "optim.base_batch_size", "an int >= 1",
               self.base_batch_size)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "an int >= 0", self.warmup_steps)
        _check(self.step_epochs >= 1, "optim.step_epochs", "an int >= 1", self.step_epochs)
        _check(0 < self.gamma <= 1, "optim.gamma", "a number in (0, 1]", self.gamma)
        _check(0 <= self.label_smoothing < 1, "optim.label_smoothing", "a number in [0, 1)",
               self.label_smoothing)
        _check(not (self.nesterov and self.name == "sgd" and self.momentum == 0),
               "optim.nesterov", "false when optim.momentum is 0", self.nesterov)


@dataclass(kw_only=True)
class TrainConfig:
    """The training run: data, batch, precision, outputs."""

    shards: str = ""
    """Shard directory or file:// URI ("" = shard.out_dir)."""
    dataset_version: str = ""
    """Expected dataset version (sha256 from prepare); shards of another version are
    refused. "" = train on whatever version the shards hold."""
    out_dir: str = "outputs/train"
    """Final model (model.pt + model.json), metrics.jsonl, traces."""
    epochs: int = 60
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    batch_size: int = 64
    """Global batch per optimizer step, over all data-parallel ranks and accumulation."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (DDP skips the all-reduce with no_sync)."""
    streams: int = 0
    """Data streams the global batch is drawn from (0 = one per rank). Set it to a
    multiple of every world size you use (e.g. 4) and the same seed gives the same global
    batches, and so the same losses, with 1, 2 or 4 processes."""
    seed: int = 0
    loader_workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""
    augment: bool = True
    """Random crop (padding 1/8 of the size) and, when `flip`, horizontal flip."""
    flip: bool = False
    """Horizontal flip: off for digits (a flipped 2 is no 2); on for natural images."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 = autocast the forward pass to bfloat16 (CPU and CUDA)."""
    channels_last: bool = False
    compile: bool = False
    """torch.compile the model (slow first steps; pays off on long GPU runs)."""
    threads: int = 0
    """Intra-op threads per process (0 = available cores / local processes)."""
    log_every: int = 10
    """Log step metrics every this many steps."""
    profile_steps: int = 0
    """Record a torch.profiler Chrome trace of this many steps on every rank (0 = off)."""
    profile_wait: int = 2
    """Steps to skip before the profiled ones (warm-up)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            _check(value >= 1, f"train.{name}", "an int >= 1", value)
        _check(self.seed >= 0, "train.seed", "an int >= 0", self.seed)
        for name in ("max_steps", "streams", "loader_workers", "threads", "profile_steps",
                     "profile_wait"):
            value = getattr(self, name)
            _check(value >= 0, f"train.{name}", "an int >= 0", value)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Atomic checkpoints and automatic resume."""

    dir: str = "outputs/checkpoints"
    every_steps: int = 0
    """Also checkpoint every this many steps (0 = only at each epoch end)."""
    keep: int = 3
    """Complete checkpoints to keep (oldest deleted first)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in `dir` when there is one."""
    fresh: bool = False
    """Start from scratch even if `dir` holds a checkpoint of another model or data set
    (those are refused otherwise). Existing checkpoints are moved aside, not deleted."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", "an int >= 0",
               self.every_steps)
        _check(self.keep >= 1, "checkpoint.keep", "an int >= 1", self.keep)


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow tracking: where runs go, what happens when the server is missing."""

    enabled: bool = True
    """false = NullTracker (nothing logged)."""
    uri: str = ""
    """Tracking URI; "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow/mlflow.db (cwd)."""
    experiment: str = "cnnflow"
    offline: bool = False
    """Log to the local sqlite store and never contact a server (says where in the log)."""
    check_timeout_s: float = 5.0
    """Seconds to wait for the server's /health before failing, before any training."""
    log_system_metrics: bool = False
    """CPU/memory/disk/network (and GPU) sampled every 10 s, logged every minute."""
    spool_dir: str = ""
    """Where tracking calls go if the server dies mid-run ("" = <out dir>/mlflow-spool)."""
    model_name: str = "cnnflow"
    """Registered model name (no '/', ':', '@'; MLflow path rules)."""

    def __post_init__(self) -> None:
        _check(self.check_timeout_s > 0, "tracking.check_timeout_s", "> 0 seconds",
               self.check_timeout_s)
        _check(bool(self.experiment.strip()), "tracking.experiment", "a non-empty name",
               self.experiment)
        _check(bool(self.model_name) and not any(c in self.model_name for c in "/:@"),
               "tracking.model_name", "a name without '/', ':' or '@'", self.model_name)


@dataclass(kw_only=True)
class EvaluateConfig:
    """Score the test split, register the model, maybe promote it."""

    model: str = ""
    """"" = train.out_dir; or models:/<name>@<alias>, models:/<name>/<version>,
    runs:/<id>/model."""
    out_dir: str = "reports"
    top_k: int = 3
    batch_size: int = 256
    max_misclassified: int = 36
    """Images in reports/plots/misclassified.png."""
    register: bool = True
    """Register the evaluated model version as @challenger with its test metrics."""
    promote: bool = True
    margin: float = 0.0
    """Test-accuracy gain the challenger needs over the champion (0.002 = 0.2 points)."""
    promote_across_datasets: bool = False
    """Promote a challenger trained on another dataset version (figures not comparable)."""

    def __post_init__(self) -> None:
        for name in ("top_k", "batch_size"):
            _check(getattr(self, name) >= 1, f"evaluate.{name}", "an int >= 1",
                   getattr(self, name))
        _check(self.max_misclassified >= 0, "evaluate.max_misclassified", "an int >= 0",
               self.max_misclassified)
        _check(0 <= self.margin < 1, "evaluate.margin", "a number in [0, 1)", self.margin)


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
