#!/usr/bin/env python3
"""Reads a TensorBoard log directory with TensorBoard's own event reader and prints JSON:
{"scalars": {tag: [[step, value], ...]}, "histograms": {tag: [[step, count], ...]},
 "texts": {tag: [[step, text], ...]}}. Used by rlrun's tests to check the event files it writes.

Usage: read_tensorboard.py LOGDIR
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(logdir):
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    out = {"scalars": {}, "histograms": {}, "texts": {}}
    for t in tags.get("scalars", []):
        out["scalars"][t] = [[e.step, e.value] for e in acc.Scalars(t)]
    for t in tags.get("histograms", []):
        out["histograms"][t] = [[e.step, e.histogram_value.num] for e in acc.Histograms(t)]
    for t in tags.get("tensors", []):
        out["texts"][t] = [[e.step, e.tensor_proto.string_val[0].decode()] for e in acc.Tensors(t)]
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
