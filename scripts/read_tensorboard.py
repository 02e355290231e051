"""Reads a TensorBoard log directory with TensorBoard's own EventAccumulator and prints its
scalars as JSON: {"tag": [[step, value], ...], ...}. Used by tests/it/observe.rs; also handy by
hand: .cache/pytools/bin/python scripts/read_tensorboard.py runs/rotten-tomatoes/tensorboard
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})  # 0: keep every point
acc.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))
