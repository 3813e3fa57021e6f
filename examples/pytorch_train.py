"""A PyTorch model trained with its BatchNorms on a normserve server, beside the same model with
PyTorch's own, from the same start on the same batches: the losses and the eval outputs agree to
float32 rounding. Then the run's modules are deleted from the server.

    npm ci && npm start                                  # a server on localhost:50051
    /usr/bin/python3 -m venv --system-site-packages .venv
    .venv/bin/pip install --no-build-isolation --no-deps ./clients/python
    .venv/bin/python examples/pytorch_train.py --address localhost:50051
"""
from __future__ import annotations

import argparse
import copy
import uuid

import torch
import torch.nn.functional as F
from torch import nn

import normserve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", default="localhost:50051")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    local = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    prefix = f"examples/pytorch-train/{uuid.uuid4().hex[:8]}/"
    with normserve.Client(args.address) as client:
        remote = normserve.convert_remote_batchnorm(copy.deepcopy(local), client, prefix)
        optimisers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (local, remote)]
        batches = [(torch.randn(16, 3, 12, 12) * 1.5 + 0.3, torch.randint(0, 4, (16,))) for _ in range(args.steps)]
        for step, (x, y) in enumerate(batches):
            losses = []
            for model, optimiser in zip((local, remote), optimisers):
                optimiser.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
            print(f"step {step}: loss local {losses[0]:.6f} remote {losses[1]:.6f}")
        local.eval()
        remote.eval()
        with torch.no_grad():
            gap = (remote(batches[0][0]) - local(batches[0][0])).abs().max().item()
        counter = int(remote.get_submodule("1").num_batches_tracked)
        print(f"eval: largest output difference {gap:.3g}; num_batches_tracked {counter}")
        deleted = normserve.delete_modules(client, prefix)
        print(f"deleted {len(deleted)} modules under {prefix}")
        if counter != args.steps or not gap < 1e-3:
            raise SystemExit("the remote model left PyTorch's numbers")


if __name__ == "__main__":
    main()
