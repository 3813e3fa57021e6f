"""A PyTorch user's training step with remote BatchNorm beside the same step with PyTorch's own
(issue 15): torchvision's resnet18 (weights=None), SGD with momentum, cross-entropy, the step
from zero_grad to optimiser.step(). The local model and two converted deep copies (one client
over the wire, one over shared memory where the server offers it) train on the same batches,
steps alternating between them; medians. Per remote step: the calls it made and the tensor bytes
that went through gRPC messages, from the server's Prometheus counters.

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
    run = uuid.uuid4().hex[:8]
    clients = {"wire": normserve.Client(args.address, shared_memory=False), "shm": normserve.Client(args.address)}
    models = {"local": local}
    for key, c in clients.items():
        models[key] = normserve.convert_remote_batchnorm(copy.deepcopy(local), c, prefix=f"bench/resnet18/{run}/{key}/")
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
    calls = dict.fromkeys(clients, 0.0)
    moved = dict.fromkeys(clients, 0.0)
    for i in range(args.steps):
        times["local"].append(step("local", i))
        for key in clients:
            before = scrape(args.metrics)
            times[key].append(step(key, i))
            after = scrape(args.metrics)
            # The scrapes themselves are not normserve calls: they go to the metrics port.
            calls[key] += after[0] - before[0]
            moved[key] += after[1] - before[1]
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    norms = sum(1 for m in models["wire"].modules() if isinstance(m, normserve.RemoteNorm))
    remote = {
        key: {
            "ms": ms[key],
            "ratio": ms[key] / ms["local"],
            "calls_per_step": calls[key] / args.steps,
            "message_bytes_per_step": moved[key] / args.steps,
            "shared_memory": c.shared_memory_directory(),
        }
        for key, c in clients.items()
    }
    print(json.dumps({
        "model": "resnet18",
        "input": [args.batch, 3, args.size, args.size],
        "batch_norms": norms,
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "local_ms": ms["local"],
        "remote": remote,
    }))
    for c in clients.values():
        c.close()


if __name__ == "__main__":
    main()
