"""GPU training throughput of ResNet-18 (CIFAR variant) and the fraction of bf16 peak.

    .venv/bin/python bench/gpu.py                          # CUDA if present, else tiny CPU run
    .venv/bin/python bench/gpu.py --batch 512 --steps 100 --peak-tflops 989
    .venv/bin/python bench/gpu.py --device cpu --steps 2 --batch 8 --no-compile

Measured: images/s of training steps (forward, cross-entropy, backward, SGD step) of
`build_model(ModelConfig(name="resnet18"), in_shape=(32, 32, 3))` on synthetic 32x32x3
images already on the device, with bf16 autocast, channels_last and torch.compile
(`--no-compile` to skip it; off by default on CPU), after `--warmup` untimed steps
(compilation happens there). Model FLOPs per image come from
`torch.utils.flop_counter.FlopCounterMode` on one forward pass (2 FLOPs per MAC) x 3 for
forward + backward; achieved TFLOP/s / `--peak-tflops` (default 989: H100/H200 SXM bf16
dense) is the fraction of peak. On a CPU that fraction means nothing; it is printed so the
line is always there.

Baseline, same run: the same loop in fp32, eager, default memory format. Ratio = images/s
of the optimised loop / the baseline's.

Target: on a lent H100/H200, well above the fp32 baseline (ratio >> 1) and a fraction of
bf16 peak worth reporting (ResNet-18 at 32x32 is small-kernel work: ~0.2-0.4 is good).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cnnflow.config import ModelConfig
from cnnflow.models import build_model


def model_flops_per_image(device: torch.device) -> float:
    """Training FLOPs per image: 3 x the forward FLOPs FlopCounterMode counts."""
    model = build_model(ModelConfig(name="resnet18"), in_shape=(32, 32, 3), num_classes=10)
    model = model.to(device).eval()
    x = torch.zeros(2, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return 3 * counter.get_total_flops() / len(x)


def images_per_s(device: torch.device, *, batch: int, steps: int, warmup: int, bf16: bool,
                 channels_last: bool, compile_model: bool) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18"), in_shape=(32, 32, 3), num_classes=10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    step_model = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = step_model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--batch", type=int, default=0, help="0 = 512 on CUDA, 8 on CPU")
    parser.add_argument("--steps", type=int, default=0, help="timed; 0 = 50 CUDA, 2 CPU")
    parser.add_argument("--warmup", type=int, default=0, help="untimed; 0 = 10 CUDA, 1 CPU")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="bf16 dense peak of the device, TFLOP/s (H100/H200 SXM: 989)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    cuda = device.type == "cuda"
    batch = args.batch or (512 if cuda else 8)
    steps = args.steps or (50 if cuda else 2)
    warmup = args.warmup or (10 if cuda else 1)
    compile_model = cuda and not args.no_compile
    if cuda:
        torch.backends.cudnn.benchmark = True

    flops = model_flops_per_image(device)
    base = images_per_s(device, batch=batch, steps=steps, warmup=warmup, bf16=False,
                        channels_last=False, compile_model=False)
    fast = images_per_s(device, batch=batch, steps=steps, warmup=warmup, bf16=True,
                        channels_last=True, compile_model=compile_model)
    label = torch.cuda.get_device_name(device) if cuda else "CPU"
    opt_name = "bf16 + channels_last" + (" + compile" if compile_model else "")
    print(f"ResNet-18 (CIFAR), 32x32x3, batch {batch}, {steps} timed steps after {warmup}, "
          f"{label}; {flops / 1e9:.3f} GFLOP per image (fwd + bwd)")
    print(f"{'loop':<36}{'images/s':>12}{'TFLOP/s':>10}{'of peak':>9}")
    for loop, rate in (("fp32 eager (baseline)", base), (opt_name, fast)):
        tflops = rate * flops / 1e12
        print(f"{loop:<36}{rate:>12,.1f}{tflops:>10.3f}{tflops / args.peak_tflops:>9.4f}")
    print(f"ratio {opt_name} / fp32 eager: {fast / base:.3f}")
    print(f"fraction of bf16 peak ({args.peak_tflops:g} TFLOP/s): "
          f"{fast * flops / 1e12 / args.peak_tflops:.4f}")


if __name__ == "__main__":
    main()
