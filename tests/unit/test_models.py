"""Unit tests for cnnflow.models: shapes, sizes, errors, pipeline cut points, rebuild."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cnnflow.config import ModelConfig
from cnnflow.errors import ConfigError
from cnnflow.models import (
    MODELS,
    AllReduceBatchNorm2d,
    blocks_module,
    build_model,
    convert_norm_for_distributed,
    count_parameters,
    model_config_dict,
    model_from_config_dict,
    pipeline_blocks,
)

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]


def _build(name: str = "small_cnn", in_shape=(8, 8, 1), num_classes: int = 10, **kw):
    """No dropout unless asked: the tests compare train-mode outputs of two builds."""
    kw.setdefault("dropout", 0.0)
    return build_model(ModelConfig(name=name, **kw), in_shape=in_shape, num_classes=num_classes)


def _batch(in_shape, n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w, c = in_shape
    return torch.randn(n, c, h, w, generator=g)


@pytest.mark.parametrize("in_shape", SHAPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_shape_for_every_model_and_input(name, in_shape):
    torch.manual_seed(0)
    model = _build(name, in_shape, num_classes=7)
    with torch.no_grad():
        out = model(_batch(in_shape))  # train mode: BatchNorm needs > 1 value per channel
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()
        assert model.eval()(_batch(in_shape, n=1)).shape == (1, 7)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_parameter_gets_a_gradient(name):
    model = _build(name, (8, 8, 1))
    model(_batch((8, 8, 1))).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "expected"), [("resnet20", 0.27e6), ("resnet56", 0.85e6), ("resnet18", 11.2e6)]
)
def test_parameter_counts_match_the_papers(name, expected):
    n = count_parameters(_build(name, (32, 32, 3)))
    assert abs(n - expected) / expected < 0.03, n


def test_small_cnn_pools_8x8_to_2x2_and_grows_by_depth_and_width():
    model = _build("small_cnn", (8, 8, 1)).eval()
    assert len(model.blocks) == 2
    assert model.blocks(_batch((8, 8, 1))).shape == (2, 128, 2, 2)  # width 64 doubled once
    deeper = _build("small_cnn", (28, 28, 1), depth=3, width=8)
    assert [b.conv.out_channels for b in deeper.blocks] == [8, 16, 32]
    assert deeper.blocks(_batch((28, 28, 1))).shape == (2, 32, 3, 3)  # 28 -> 14 -> 7 -> 3
    assert count_parameters(deeper) < count_parameters(_build("small_cnn", (28, 28, 1)))


def test_resnet_depth_and_width_overrides():
    model = _build("resnet20", (32, 32, 3), depth=32, width=8)
    assert [len(model.get_submodule(f"stage{i}")) for i in (1, 2, 3)] == [5, 5, 5]
    assert model.head.fc.in_features == 32  # 8 * 4
    assert len(_build("resnet18", (32, 32, 3), depth=10, width=4).stage4) == 1


@pytest.mark.parametrize(("name", "depth"), [("resnet20", 21), ("resnet56", 4), ("resnet18", 20)])
def test_bad_resnet_depth_names_model_depth(name, depth):
    with pytest.raises(ConfigError, match=r"^model\.depth: expected 0 or .*got " + str(depth)):
        _build(name, depth=depth)


def test_group_norm_replaces_batch_norm():
    model = _build("resnet20", (8, 8, 1), norm="group", groups=4)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 4 for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # Group norm has no cross-sample statistics: one sample's output ignores the others.
    x = _batch((8, 8, 1), n=3)
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)


@pytest.mark.parametrize(("name", "groups"), [("resnet20", 5), ("small_cnn", 3), ("resnet18", 128)])
def test_groups_that_do_not_divide_a_channel_count_name_model_groups(name, groups):
    pattern = r"^model\.groups: expected a divisor .*got " + str(groups)
    with pytest.raises(ConfigError, match=pattern):
        _build(name, norm="group", groups=groups)


def test_unknown_model_name():
    cfg = ModelConfig(name="vgg16")  # type: ignore[arg-type]  # as if loaded from a file
    with pytest.raises(ConfigError, match=r"^model\.name: expected one of 'small_cnn', .*'vgg16'"):
        build_model(cfg, in_shape=(8, 8, 1), num_classes=10)
    d = model_config_dict(ModelConfig(), (8, 8, 1), 10) | {"name": "vgg16"}
    with pytest.raises(ConfigError, match=r"^model\.name"):
        model_from_config_dict(d)


def test_bad_in_shape_and_classes():
    with pytest.raises(ConfigError, match=r"^model\.in_shape"):
        _build(in_shape=(8, 8))
    with pytest.raises(ConfigError, match=r"^model\.num_classes"):
        _build(num_classes=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_pipeline_blocks_in_sequence_equal_forward(name):
    torch.manual_seed(0)
    model = _build(name, (8, 8, 1), norm="batch", dropout=0.5).eval()
    x = _batch((8, 8, 1), n=3)
    blocks = pipeline_blocks(model)
    y = x
    for _, block in blocks:
        y = block(y)
    assert torch.equal(y, model(x))
    names = [n for n, _ in blocks]
    assert names[-1] == "head"
    for n, block in blocks:
        assert model.get_submodule(n) is block
    if name.startswith("resnet"):
        assert names[0] == "stem" and "stage1.0" in names  # each residual block separately
        n_blocks = sum(len(c) for n, c in model.named_children() if n.startswith("stage"))
        assert len(names) == n_blocks + 2


def test_blocks_module_is_a_pipeline_stage_with_the_full_models_names():
    torch.manual_seed(0)
    model = _build("resnet20", (8, 8, 1)).eval()
    names = [n for n, _ in pipeline_blocks(model)]
    first, second = blocks_module(model, names[:5]), blocks_module(model, names[5:])
    x = _batch((8, 8, 1))
    assert torch.equal(second(first(x)), model(x))
    full = model.state_dict()
    for stage in (first, second):
        for key, value in stage.state_dict().items():
            assert torch.equal(value, full[key])
    assert set(first.state_dict()) | set(second.state_dict()) == set(full)
    with pytest.raises(ValueError, match="consecutive"):
        blocks_module(model, [names[0], names[2]])
    with pytest.raises(ValueError, match="unknown"):
        blocks_module(model, ["stage9.0"])


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(name="small_cnn", depth=3, dropout=0.1),
        ModelConfig(name="resnet20", norm="group", groups=8, width=8),
        ModelConfig(name="resnet18", width=8, norm="syncbatch"),
    ],
)
def test_config_dict_round_trip_rebuilds_the_same_module(cfg):
    torch.manual_seed(0)
    model = build_model(cfg, in_shape=(28, 28, 1), num_classes=10)
    model(_batch((28, 28, 1), n=4))  # move BatchNorm running stats off their init
    d = json.loads(json.dumps(model_config_dict(cfg, (28, 28, 1), 10)))
    assert d["format"] == 1 and d["in_shape"] == [28, 28, 1] and d["name"] == cfg.name
    torch.manual_seed(123)
    rebuilt = model_from_config_dict(d)
    assert type(rebuilt) is type(model)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = _batch((28, 28, 1), n=3)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_config_dict_errors():
    d = model_config_dict(ModelConfig(), (8, 8, 1), 10)
    with pytest.raises(ConfigError, match=r"^model\.format"):
        model_from_config_dict(d | {"format": 2})
    with pytest.raises(ConfigError, match=r"^model\.colour: unknown key"):
        model_from_config_dict(d | {"colour": 1})
    with pytest.raises(ConfigError, match=r"^model\.num_classes: missing"):
        model_from_config_dict({k: v for k, v in d.items() if k != "num_classes"})
    with pytest.raises(ConfigError, match=r"^model\.dropout"):
        model_from_config_dict(d | {"dropout": 1.5})


@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
def test_init_is_deterministic_under_manual_seed(name):
    torch.manual_seed(42)
    a = _build(name).state_dict()
    torch.manual_seed(42)
    b = _build(name).state_dict()
    torch.manual_seed(43)
    c = _build(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    model = _build(name)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_convert_norm_for_distributed():
    torch.manual_seed(0)
    model = _build("resnet20", norm="syncbatch")
    keys = set(model.state_dict())
    assert convert_norm_for_distributed(model, "batch") is model
    assert not any(isinstance(m, AllReduceBatchNorm2d) for m in model.modules())
    ref = copy.deepcopy(model)
    converted = convert_norm_for_distributed(model, ModelConfig(norm="syncbatch"))
    bns = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(type(m) is AllReduceBatchNorm2d for m in bns)
    assert set(converted.state_dict()) == keys
    x = _batch((8, 8, 1), n=4)
    assert torch.allclose(converted(x), ref(x), atol=1e-6)  # no process group: plain BN
    cuda = convert_norm_for_distributed(copy.deepcopy(ref), "syncbatch", device="cuda")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in cuda.modules())


def _allreduce_bn_worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        x = torch.randn(8, 4, 5, 5) * 3 + 1
        g = torch.randn_like(x)
        ref = nn.BatchNorm2d(4)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
        bn = AllReduceBatchNorm2d.from_batchnorm(copy.deepcopy(ref))
        x_ref = x.clone().requires_grad_()
        out_ref = ref(x_ref)
        (out_ref * g).sum().backward()
        lo, hi = (0, 3) if rank == 0 else (3, 8)  # uneven: statistics must weight by count
        x_loc = x[lo:hi].clone().requires_grad_()
        out = bn(x_loc)
        (out * g[lo:hi]).sum().backward()
        torch.testing.assert_close(out, out_ref[lo:hi], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_loc.grad, x_ref.grad[lo:hi], atol=1e-5, rtol=1e-5)
        for p, p_ref in ((bn.weight, ref.weight), (bn.bias, ref.bias)):
            grad = p.grad.clone()
            dist.all_reduce(grad)  # what DDP does (up to its 1/world scaling)
            torch.testing.assert_close(grad, p_ref.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(bn.running_mean, ref.running_mean)
        torch.testing.assert_close(bn.running_var, ref.running_var)
        dist.barrier()  # neither rank tears down its connections while the other still reads
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_allreduce_batchnorm_over_two_gloo_ranks_equals_full_batch(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_allreduce_bn_worker, args=(2, port), nprocs=2, join=True)
