"""`cnnflow pipeline run`'s terminal: kfp.local's lines go to the log file (and, with -v,
to the terminal too); the terminal gets a line per step as it starts and ends."""

from __future__ import annotations

import io
import json
import re

from cnnflow.pipeline import Console

KFP_LINES = [
    "21:25:57.047 - INFO - Executing task \x1b[96m'shard'\x1b[0m\n",
    "    Got executor_input: {...}\n",
    "    step shard: started, cold start 1.90 s, loaded kfp,mlflow,numpy\n",
    "21:26:01.100 - INFO - Task \x1b[96m'shard'\x1b[0m finished with status "
    "\x1b[92mSUCCESS\x1b[0m\n",
    "21:26:01.200 - INFO - Executing task 'train'\n",
    "    cnnflow: error: step train failed: train.batch_size=4096: larger than the 179 "
    "training samples per stream; lower it or use fewer streams\n",
    "21:26:09.300 - ERROR - Task 'train' finished with status FAILURE\n",
]


def _console(tmp_path, verbose: bool):
    task = tmp_path / "cnn-training-2026" / "shard"
    task.mkdir(parents=True)
    (task / "executor_output.json").write_text(json.dumps({"artifacts": {"shards": {
        "artifacts": [{"metadata": {"shards": 8, "dataset_version": "6b586e120e22ff"}}]}}}))
    log, terminal = io.StringIO(), io.StringIO()
    console = Console(log, terminal, tmp_path, verbose=verbose)
    for line in KFP_LINES:  # kfp.local writes pieces, not always whole lines
        half = len(line) // 2
        console.write(line[:half])
        console.write(line[half:])
    return log.getvalue(), terminal.getvalue().splitlines(), console


def test_steps_on_the_terminal_everything_in_the_log(tmp_path):
    log, shown, console = _console(tmp_path, verbose=False)
    assert "\x1b[" not in log and "Got executor_input" in log
    assert log.count("\n") == len(KFP_LINES)
    assert shown[0] == "[2/5] shard    started"
    assert shown[1].startswith("[2/5] shard    ok ") and shown[1].endswith(
        "  8 shards of 6b586e120e22")
    assert shown[2] == "[3/5] train    started"
    assert shown[3].startswith("[3/5] train    FAILED ") and shown[3].endswith(
        "  step train failed: train.batch_size=4096: larger than the 179 training samples "
        "per stream; lower it or use fewer streams")
    assert len(shown) == 4
    assert console.finished == {"shard": "SUCCESS", "train": "FAILURE"}


def test_verbose_shows_the_whole_log_live(tmp_path):
    log, shown, _ = _console(tmp_path, verbose=True)
    assert "    Got executor_input: {...}" in shown
    steps = [re.sub(r"[\d.]+ s  ", "S", line) for line in shown if line.startswith("[")]
    quiet = _console(tmp_path / "quiet", verbose=False)[1]
    assert steps == [re.sub(r"[\d.]+ s  ", "S", line) for line in quiet]
