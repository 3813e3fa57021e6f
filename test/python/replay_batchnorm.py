"""Replays training forwards through PyTorch's own BatchNorm and prints the state they leave.

Reads JSON on stdin: {"modules": [{"name", "kind": "BATCH_NORM_1D" | "BATCH_NORM_2D" | "BATCH_NORM_3D",
"num_features", "eps", "momentum" (null: cumulative average), "inputs": [{"shape": [...], "data":
base64 of little-endian float32}]}]}. Each module starts fresh, in training mode, and takes its
inputs in order. Writes JSON on stdout: {name: {"running_mean": [...], "running_var": [...],
"num_batches_tracked": int}}, the buffers as float32 values. Run with Debian's /usr/bin/python3
(python3-torch).
"""
import base64
import json
import sys

import numpy as np
import torch

CLASSES = {"BATCH_NORM_1D": torch.nn.BatchNorm1d, "BATCH_NORM_2D": torch.nn.BatchNorm2d, "BATCH_NORM_3D": torch.nn.BatchNorm3d}


def main() -> None:
    torch.set_num_threads(1)
    spec = json.load(sys.stdin)
    out = {}
    for m in spec["modules"]:
        bn = CLASSES[m["kind"]](m["num_features"], eps=m["eps"], momentum=m["momentum"])
        bn.train()
        with torch.no_grad():
            for x in m["inputs"]:
                data = np.frombuffer(base64.b64decode(x["data"]), dtype="<f4").copy()
                bn(torch.from_numpy(data).reshape(x["shape"]))
        out[m["name"]] = {
            "running_mean": bn.running_mean.tolist(),
            "running_var": bn.running_var.tolist(),
            "num_batches_tracked": int(bn.num_batches_tracked),
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
