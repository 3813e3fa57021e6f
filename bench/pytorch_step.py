"""A PyTorch user's training step with remote BatchNorm beside the same step with PyTorch's own
(issue 15): torchvision's resnet18 (weights=None), SGD with momentum, cross-entropy, the step
from zero_grad to optimiser.step(). The local model and its converted deep copy train on the same
batches, steps alternating between them; medians. Per remote step: the calls it made and the
tensor bytes they moved, from the server's Prometheus counters.

Run by bench/pytorch-step.ts (`npm run bench`), which installs the client into a virtual
environment and starts the server; prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import urllib.request
import uuid

import torch
import torch.nn.functional as F
import torchvision

import normserve


def scrape(url: str) -> tuple[float, float]:
    """normserve's call count and tensor bytes (received and sent), summed over methods."""
    calls = moved = 0.0
    with urllib.request.urlopen(url) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("normserve_grpc_calls_total"):
                calls += float(line.rsplit(" ", 1)[1])
            elif line.startswith(("normserve_grpc_received_bytes_total", "normserve_grpc_sent_bytes_total")):
                moved += float(line.rsplit(" ", 1)[1])
    return calls, moved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--metrics", required=True, help="the server's /metrics URL")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    local = torchvision.models.resnet18(weights=None, num_classes=10)
    client = normserve.Client(args.address)
    remote = normserve.convert_remote_batchnorm(copy.deepcopy(local), client, prefix=f"bench/resnet18/{uuid.uuid4().hex[:8]}/")
    models = {"local": local, "remote": remote}
    optimisers = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    batches = [(torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))) for _ in range(4)]

    def step(key: str, i: int) -> float:
        x, y = batches[i % len(batches)]
        t = time.perf_counter()
        optimisers[key].zero_grad()
        loss = F.cross_entropy(models[key](x), y)
        loss.backward()
        optimisers[key].step()
        return time.perf_counter() - t

    for i in range(args.warmup):
        for key in models:
            step(key, i)
    times: dict[str, list[float]] = {k: [] for k in models}
    calls = moved = 0.0
    for i in range(args.steps):
        times["local"].append(step("local", i))
        before = scrape(args.metrics)
        times["remote"].append(step("remote", i))
        after = scrape(args.metrics)
        # The scrapes themselves are not normserve calls: they go to the metrics port.
        calls += after[0] - before[0]
        moved += after[1] - before[1]
    local_ms = statistics.median(times["local"]) * 1e3
    remote_ms = statistics.median(times["remote"]) * 1e3
    norms = sum(1 for m in remote.modules() if isinstance(m, normserve.RemoteNorm))
    print(json.dumps({
        "model": "resnet18",
        "input": [args.batch, 3, args.size, args.size],
        "batch_norms": norms,
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "local_ms": local_ms,
        "remote_ms": remote_ms,
        "ratio": remote_ms / local_ms,
        "calls_per_step": calls / args.steps,
        "tensor_bytes_per_step": moved / args.steps,
    }))
    client.close()


if __name__ == "__main__":
    main()
