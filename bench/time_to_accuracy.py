"""Test accuracy and training time of the default digits configuration against an SVC.

    .venv/bin/python bench/time_to_accuracy.py             # 3 seeds, 1 process each, ~1 min
    .venv/bin/python bench/time_to_accuracy.py --seeds 0 1 2 3 4 --nproc 2
    .venv/bin/python bench/time_to_accuracy.py --set train.threads=1

Measured: params.yaml as it is (digits, small_cnn, its epochs, batch and optimiser), with
every output dir redirected to a temp dir. The data are prepared and sharded once
(prepare.seed stays 0, so every run sees the same split); each seed in `--seeds` sets
train.seed and trains from scratch with `cnnflow.train.trainer.train(params)` in this
process (`--nproc 2`: torchrun with 2 processes). Training wall time is the time of that
call (or of the torchrun command); threads are params.yaml's (0 = all cores / processes).
Test accuracy is computed here, not by cnnflow: the model rebuilt from model.json, its
weights from model.pt, the test split read with `build_loader(..., shuffle=False,
drop_last=False)` and normalised with `normalize_batch`.

Baseline, same run, same split: scikit-learn's `SVC(gamma=0.001)` (its classic digits
example) fitted on the train split's pixels, flattened and scaled back to the digits'
native 0..16 range (uint8 x 16 / 255) so that gamma means what it means there, scored on
the test split.

Target: the CNN's mean test accuracy >= the SVC's, with under 30 s of training per seed
on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import REPO, params_for, quiet, run, table, write_params
from sklearn.svm import SVC

from cnnflow.config import load_params
from cnnflow.data.loader import build_loader, normalize_batch
from cnnflow.data.prepare import load_prepared, prepare
from cnnflow.data.shards import write_shards
from cnnflow.models import model_from_config_dict
from cnnflow.train.trainer import train

TIME_TARGET_S = 30.0


def test_accuracy(out_dir: Path, shards: Path) -> float:
    meta = json.loads((out_dir / "model.json").read_text())
    model = model_from_config_dict(meta["model"])
    model.load_state_dict(torch.load(out_dir / "model.pt", weights_only=True))
    model.eval()
    loader = build_loader(shards, "test", batch_size=256, shuffle=False, drop_last=False)
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            x = normalize_batch(images, meta["normalize"]["mean"], meta["normalize"]["std"])
            correct += int((model(x).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def svc_accuracy(prepared: Path) -> tuple[float, float]:
    """(test accuracy, fit + score seconds) of SVC(gamma=0.001) on 0..16 pixels."""
    ds = load_prepared(prepared)

    def xy(split: str):
        images = np.asarray(ds.images(split), dtype=np.float64)
        return images.reshape(len(images), -1) * 16 / 255, np.asarray(ds.labels(split))

    start = time.perf_counter()
    clf = SVC(gamma=0.001).fit(*xy("train"))
    x, y = xy("test")
    return float((clf.predict(x) == y).mean()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra override, e.g. --set train.threads=1 (repeatable)")
    args = parser.parse_args()
    quiet()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # a relative prepare.path (data/raw/digits) is relative to the repo, not the cwd
        fixed = [*args.overrides, "prepare.seed=0"]
        raw = load_params(args.params).prepare.path
        if raw and not Path(raw).is_absolute():
            fixed.append(f"prepare.path={REPO / raw}")
        base = params_for(root, fixed, base=args.params)
        prepare(base.prepare, show_progress=False)
        write_shards(base.prepare.out_dir, base.shard.out_dir,
                     samples_per_shard=base.shard.samples_per_shard,
                     workers=base.shard.workers, show_progress=False)
        svc, svc_s = svc_accuracy(Path(base.prepare.out_dir))
        for seed in args.seeds:
            out = root / f"seed{seed}"
            params = params_for(root, [*fixed, f"train.seed={seed}",
                                       f"train.out_dir={out}", f"checkpoint.dir={out}/ckpt"],
                                base=args.params)
            if args.nproc > 1:
                path = write_params(params, root / f"seed{seed}.yaml")
                env = {**os.environ, "CNNFLOW_LOG_LEVEL": "WARNING"}
                wall = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={args.nproc}", "-m", "cnnflow.train",
                            "--params", str(path)], cwd=root, env=env)
            else:
                start = time.perf_counter()
                train(params)
                wall = time.perf_counter() - start
            results.append((seed, test_accuracy(out, Path(base.shard.out_dir)), wall))
        counts = {s: v["count"] for s, v in load_prepared(base.prepare.out_dir).meta["splits"]
                  .items()}

    tc = base.train
    print(f"digits {counts}, {base.model.name}, {tc.epochs} epochs, batch {tc.batch_size}, "
          f"{args.nproc} process(es), threads {tc.threads or 'auto'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = [[f"cnnflow seed {s}", f"{acc:.4f}", f"{wall:.1f}"] for s, acc, wall in results]
    accs = [r[1] for r in results]
    walls = [r[2] for r in results]
    mean = statistics.mean(accs)
    rows.append(["cnnflow mean", f"{mean:.4f}", f"{statistics.mean(walls):.1f}"])
    rows.append(["SVC(gamma=0.001)", f"{svc:.4f}", f"{svc_s:.2f}"])
    table(["model", "test accuracy", "train s"], rows)
    print(f"\ncnnflow test accuracy: mean {mean:.4f}, range {min(accs):.4f}..{max(accs):.4f} "
          f"over seeds {args.seeds}; SVC {svc:.4f}; mean / SVC {mean / svc:.4f}")
    ok = mean >= svc and max(walls) < TIME_TARGET_S
    print(f"target: mean >= SVC ({'met' if mean >= svc else 'BELOW'}) in < {TIME_TARGET_S:g} s "
          f"of training (slowest seed {max(walls):.1f} s): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
