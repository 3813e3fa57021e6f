#!/usr/bin/env python3
"""Golden vectors for normserve from a real PyTorch.

Run with Debian's PyTorch (`apt-get install python3-torch`; torch 1.13):

    /usr/bin/python3 scripts/make_golden.py      # or: npm run golden

It writes test/fixtures/golden/<group>.json. Seeds are fixed and PyTorch runs on one thread, so
two runs write identical files. The test suite reads the files; it does not need PyTorch.

Format. A file is {"generator", "torch_version", "group", "scenarios": [SCENARIO, ...]}.

SCENARIO = {"id", "description", "kind": BATCH_NORM_1D | BATCH_NORM_2D | BATCH_NORM_3D |
            SYNC_BATCH_NORM, "config": {"num_features", "eps", "momentum" (null = None),
            "affine", "track_running_stats"}, "initial": MODULE_STATE, "steps": [STEP, ...]}

STEP = {"op", ...arguments, "expect": {...}, "after": MODULE_STATE}, where op is one of
  update               training?, track_running_stats?, clear_buffers? (names set to None)
  forward              input: TENSOR, save? (keep the graph for the next backward)
  backward             grad_output: TENSOR (the gradients of the last saved forward)
  load_state           state: {weight?, bias?, running_mean?, running_var?: TENSOR,
                       num_batches_tracked?: int}, version: 2 | 1 | null (null: no metadata),
                       strict
  reset_running_stats, reset_parameters, get_state
and "expect" holds what applies: output (TENSOR), error ({type, message}: PyTorch's exception),
grad_input, grad_weight and grad_bias (backward; the parameter gradients absent when not affine;
with _f64 twins where the scenario has a float64 twin),
missing_keys / unexpected_keys (a load that succeeded), state_dict and state_dict_keys
(get_state; the counter as an int), and, in the precision group, output_f64 and after_f64 from a
float64 twin of the module run in lock-step.

MODULE_STATE = {training, track_running_stats, weight, bias, running_mean, running_var:
TENSOR | null, num_batches_tracked: int | null} (null is None).

TENSOR = {"shape", "dtype": float32 | float64, "b64": row-major little-endian bytes, base64}.

"after" is PyTorch's state after the step, with one exception: where load_state_dict,
reset_running_stats or reset_parameters raise, PyTorch has often changed part of the module
already; normserve changes nothing on an error, so "after" is the state before the step and
PyTorch's own is kept as "torch_after"; the generator then rolls its module back, so that the
following steps start where normserve's do.

SyncBatchNorm: PyTorch 1.13 refuses CPU input, so a single-rank SyncBatchNorm is emulated as
1.13's SyncBatchNorm behaves without a group to sync with: its rank check (at least 2D), its
zero-channel check, then plain BatchNorm.
"""

import base64
import collections
import copy
import json
import os
import sys
import zlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

OUT_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "fixtures", "golden"))
BASE_SEED = 20201002  # PR #44445's merge month, for the record


class SyncBatchNorm(_BatchNorm):
    """1.13's SyncBatchNorm where no sync is needed (world size 1), on CPU."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError("expected at least 2D input (got {}D input)".format(input.dim()))

    def forward(self, input):
        self._check_input_dim(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        return super().forward(input)


KINDS = {
    "BATCH_NORM_1D": nn.BatchNorm1d,
    "BATCH_NORM_2D": nn.BatchNorm2d,
    "BATCH_NORM_3D": nn.BatchNorm3d,
    "SYNC_BATCH_NORM": SyncBatchNorm,
}

# One input shape per accepted rank, C = 3.
SHAPES = {
    "BATCH_NORM_1D": [(6, 3), (4, 3, 5)],
    "BATCH_NORM_2D": [(4, 3, 3, 2)],
    "BATCH_NORM_3D": [(2, 3, 2, 3, 2)],
    "SYNC_BATCH_NORM": [(6, 3), (4, 3, 5), (2, 3, 3, 2), (2, 3, 2, 2, 2)],
}


def enc(t):
    t = t.detach().contiguous()
    if t.dtype == torch.float64:
        data, dtype = t.numpy().astype("<f8"), "float64"
    else:
        data, dtype = t.float().numpy().astype("<f4"), "float32"
    return {"shape": list(t.shape), "dtype": dtype, "b64": base64.b64encode(data.tobytes()).decode("ascii")}


def state_of(m):
    def t(name):
        v = getattr(m, name, None)
        return None if v is None else enc(v)

    nbt = getattr(m, "num_batches_tracked", None)
    return {
        "training": m.training,
        "track_running_stats": m.track_running_stats,
        "weight": t("weight"),
        "bias": t("bias"),
        "running_mean": t("running_mean"),
        "running_var": t("running_var"),
        "num_batches_tracked": None if nbt is None else int(nbt.item()),
    }


def error_of(e):
    return {"type": type(e).__name__, "message": str(e)}


def shape_of_rank(rank, n=2, c=3, size=2):
    return (n, c) + (size,) * (rank - 2) if rank >= 2 else (c,) * rank


def config_of(num_features, eps, momentum, affine, track, **group):
    """The constructor arguments as the fixtures record them (plus a group's, for sync)."""
    return dict({"num_features": num_features, "eps": eps, "momentum": momentum, "affine": affine, "track_running_stats": track}, **group)


class Scenario:
    def __init__(self, sid, description, kind, num_features=3, eps=1e-5, momentum=0.1, affine=True, track=True, precision=False):
        self.id = sid
        self.description = description
        self.kind = kind
        self.config = config_of(num_features, eps, momentum, affine, track)
        torch.manual_seed(BASE_SEED + zlib.crc32(sid.encode()))
        self.m = KINDS[kind](num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
        self.twin = copy.deepcopy(self.m).double() if precision else None
        self.initial = state_of(self.m)
        self.steps = []
        self.graph = None
        self.twin_graph = None

    # Inputs ------------------------------------------------------------------------------

    def data(self, shape, offset=None, spread=None):
        """Normal values with a different offset and scale for each channel."""
        x = torch.randn(shape)
        if len(shape) >= 2 and shape[1] > 0:
            c = shape[1]
            view = [1, c] + [1] * (len(shape) - 2)
            offsets = torch.empty(c).uniform_(-3, 3) if offset is None else torch.full((c,), float(offset))
            scales = torch.empty(c).uniform_(0.5, 2) if spread is None else torch.full((c,), float(spread)) * torch.linspace(1, 2, c)
            x = x * scales.view(view) + offsets.view(view)
        return x

    def params(self, c=None):
        c = self.config["num_features"] if c is None else c
        return torch.empty(c).uniform_(0.5, 1.5), torch.empty(c).uniform_(-0.5, 0.5)

    # Steps -------------------------------------------------------------------------------

    def _record(self, step, expect, saved=None, mutating_error=False):
        after = state_of(self.m)
        if mutating_error:
            # Keep what PyTorch did, then roll the module back to where normserve leaves it, so
            # that later steps start from the same state on both sides.
            before = state_of(saved[0])
            if after != before:
                step["torch_after"] = after
            self.m, self.twin = saved
            after = before
        if self.twin is not None:
            expect["after_f64"] = state_of(self.twin)
        step["expect"] = expect
        step["after"] = after
        self.steps.append(step)
        return self

    def update(self, training=None, track=None, clear=()):
        step = {"op": "update"}
        for mod in [self.m] + ([self.twin] if self.twin is not None else []):
            if training is not None:
                mod.train(training)
            if track is not None:
                mod.track_running_stats = track
            for name in clear:
                setattr(mod, name, None)
        if training is not None:
            step["training"] = training
        if track is not None:
            step["track_running_stats"] = track
        if clear:
            step["clear_buffers"] = list(clear)
        return self._record(step, {})

    def forward(self, x, save=False):
        step = {"op": "forward", "input": enc(x)}
        expect = {}
        if save:
            step["save"] = True
            x = x.clone().requires_grad_(True)
        try:
            y = self.m(x)
            expect["output"] = enc(y)
            if save:
                self.graph = (x, y)
        except Exception as e:  # noqa: BLE001 - every PyTorch exception is a fixture
            expect["error"] = error_of(e)
        if self.twin is not None:
            try:
                x64 = x.detach().double().requires_grad_(save)
                y64 = self.twin(x64)
                expect["output_f64"] = enc(y64)
                if save:
                    self.twin_graph = (x64, y64)
            except Exception:  # noqa: BLE001
                pass
        return self._record(step, expect)

    def backward(self, dy):
        x, y = self.graph
        for p in self.m.parameters():
            p.grad = None
        x.grad = None
        step = {"op": "backward", "grad_output": enc(dy)}
        expect = {}
        try:
            y.backward(dy, retain_graph=True)
            expect["grad_input"] = enc(x.grad)
            if self.m.affine:
                expect["grad_weight"] = enc(self.m.weight.grad)
                expect["grad_bias"] = enc(self.m.bias.grad)
        except Exception as e:  # noqa: BLE001
            expect["error"] = error_of(e)
        if self.twin is not None and "error" not in expect:
            x64, y64 = self.twin_graph
            for p in self.twin.parameters():
                p.grad = None
            y64.backward(dy.double(), retain_graph=True)
            expect["grad_input_f64"] = enc(x64.grad)
            if self.twin.affine:
                expect["grad_weight_f64"] = enc(self.twin.weight.grad)
                expect["grad_bias_f64"] = enc(self.twin.bias.grad)
        return self._record(step, expect)

    def load(self, state, version=2, strict=True):
        def build(dtype):
            sd = collections.OrderedDict()
            for key in ("weight", "bias", "running_mean", "running_var"):
                if key in state:
                    sd[key] = state[key].to(dtype)
            if "num_batches_tracked" in state:
                sd["num_batches_tracked"] = torch.tensor(state["num_batches_tracked"], dtype=torch.long)
            if version is not None:
                sd._metadata = {"": {"version": version}}
            return sd

        step = {"op": "load_state", "state": {}, "version": version, "strict": strict}
        for key, value in state.items():
            step["state"][key] = int(value) if key == "num_batches_tracked" else enc(value)
        saved = (copy.deepcopy(self.m), copy.deepcopy(self.twin))
        expect = {}
        try:
            result = self.m.load_state_dict(build(torch.float32), strict=strict)
            expect["missing_keys"] = list(result.missing_keys)
            expect["unexpected_keys"] = list(result.unexpected_keys)
        except Exception as e:  # noqa: BLE001
            expect["error"] = error_of(e)
        if self.twin is not None and "error" not in expect:
            self.twin.load_state_dict(build(torch.float64), strict=strict)
        return self._record(step, expect, saved, mutating_error="error" in expect)

    def _reset(self, op):
        saved = (copy.deepcopy(self.m), copy.deepcopy(self.twin))
        expect = {}
        try:
            getattr(self.m, op)()
            if self.twin is not None:
                getattr(self.twin, op)()
        except Exception as e:  # noqa: BLE001
            expect["error"] = error_of(e)
        return self._record({"op": op}, expect, saved, mutating_error="error" in expect)

    def reset_running_stats(self):
        return self._reset("reset_running_stats")

    def reset_parameters(self):
        return self._reset("reset_parameters")

    def get_state(self):
        sd = self.m.state_dict()
        expect = {
            "state_dict_keys": list(sd.keys()),
            "state_dict": {k: (int(v.item()) if k == "num_batches_tracked" else enc(v)) for k, v in sd.items()},
        }
        return self._record({"op": "get_state"}, expect)

    def load_random_affine(self):
        """Non-trivial weight and bias, by a non-strict load (as a user restoring parameters would)."""
        if not self.config["affine"]:
            return self
        w, b = self.params()
        return self.load({"weight": w, "bias": b}, strict=False)

    def to_json(self):
        return {
            "id": self.id,
            "description": self.description,
            "kind": self.kind,
            "config": self.config,
            "initial": self.initial,
            "steps": self.steps,
        }


def short(kind):
    return {"BATCH_NORM_1D": "bn1d", "BATCH_NORM_2D": "bn2d", "BATCH_NORM_3D": "bn3d", "SYNC_BATCH_NORM": "sync"}[kind]


def label(shape):
    return "x".join(str(d) for d in shape)


def kind_shapes():
    for kind, shapes in SHAPES.items():
        for shape in shapes:
            yield kind, shape


def one_value(shape):
    return (1, shape[1]) + (1,) * (len(shape) - 2)


# Groups -----------------------------------------------------------------------------------


def truth_table():
    out = []
    for kind, shape in kind_shapes():
        tag = "{}-{}".format(short(kind), label(shape))
        s = Scenario("tt-rows-1-5-" + tag, "rows 1 and 5: train updates buffers and counter, eval uses them", kind)
        s.load_random_affine()
        for _ in range(3):
            s.forward(s.data(shape))
        s.update(training=False).forward(s.data(shape)).forward(s.data(one_value(shape)))
        s.update(training=True).forward(s.data(shape))
        out.append(s)

        s = Scenario("tt-rows-3-7-" + tag, "rows 3 and 7: flag flipped off at runtime: batch stats, buffers and counter frozen; eval uses them", kind)
        s.load_random_affine()
        s.forward(s.data(shape)).forward(s.data(shape))
        s.update(track=False).forward(s.data(shape)).forward(s.data(shape))
        s.update(training=False).forward(s.data(shape)).forward(s.data(one_value(shape)))
        out.append(s)

        s = Scenario("tt-rows-4-8-" + tag, "rows 4 and 8: built without tracking: batch stats in train and eval", kind, track=False)
        s.load_random_affine()
        s.forward(s.data(shape)).forward(s.data(shape))
        s.update(training=False).forward(s.data(shape)).forward(s.data(one_value(shape)))
        out.append(s)

        s = Scenario("tt-rows-2-6-flipped-on-" + tag, "rows 2 and 6: built without tracking, flag set True: no buffers, no counter", kind, track=False)
        s.update(track=True).forward(s.data(shape)).forward(s.data(shape))
        s.update(training=False).forward(s.data(shape)).forward(s.data(one_value(shape)))
        out.append(s)

        s = Scenario("tt-rows-2-6-cleared-" + tag, "rows 2 and 6: buffers set to None, counter kept: it still increments", kind)
        s.load_random_affine()
        s.forward(s.data(shape))
        s.update(clear=("running_mean", "running_var")).forward(s.data(shape)).forward(s.data(shape))
        s.update(training=False).forward(s.data(shape)).forward(s.data(one_value(shape)))
        out.append(s)
    return out


def momentum():
    out = []
    for kind, shape in [("BATCH_NORM_2D", (4, 3, 3, 3)), ("BATCH_NORM_1D", (8, 3)), ("BATCH_NORM_3D", (2, 3, 2, 2, 3)), ("SYNC_BATCH_NORM", (3, 3, 4))]:
        tag = short(kind)
        s = Scenario("momentum-none-fresh-" + tag, "momentum=None: after k steps the buffers are the mean of the k batch statistics", kind, momentum=None)
        for _ in range(6):
            s.forward(s.data(shape))
        s.update(training=False).forward(s.data(shape))
        out.append(s)

    s = Scenario("momentum-none-counter-cleared", "momentum=None with the counter set to None: the factor stays 0 and the buffers never move", "BATCH_NORM_1D", momentum=None)
    s.forward(s.data((4, 3))).update(clear=("num_batches_tracked",)).forward(s.data((4, 3))).forward(s.data((4, 3)))
    out.append(s)

    s = Scenario("momentum-none-loaded-counter", "momentum=None after loading num_batches_tracked=4: the next factor is 1/5", "BATCH_NORM_2D", momentum=None)
    w, b = s.params()
    s.load({"weight": w, "bias": b, "running_mean": torch.randn(3), "running_var": torch.rand(3) + 0.5, "num_batches_tracked": 4})
    for _ in range(3):
        s.forward(s.data((4, 3, 2, 3)))
    s.get_state()
    out.append(s)

    for m, name in [(0.0, "zero"), (1.0, "one"), (0.3, "0.3"), (0.01, "0.01")]:
        s = Scenario("momentum-" + name, "momentum={}: the update rule (1-m)*old + m*batch; the counter always increments".format(m), "BATCH_NORM_2D", momentum=m)
        s.load_random_affine()
        for _ in range(3):
            s.forward(s.data((3, 3, 4, 2)))
        s.update(training=False).forward(s.data((3, 3, 4, 2)))
        out.append(s)
    return out


def flag_flip():
    out = []
    s = Scenario("flip-momentum-0.1", "train, flip off (buffers and counter frozen), eval with frozen buffers and a (1,C,1,1) input, flip back on", "BATCH_NORM_2D")
    s.load_random_affine()
    shape = (4, 3, 2, 2)
    s.forward(s.data(shape)).forward(s.data(shape))
    s.update(track=False).forward(s.data(shape)).forward(s.data(shape))
    s.update(training=False).forward(s.data(shape)).forward(s.data((1, 3, 1, 1)))
    s.update(training=True, track=True).forward(s.data(shape))
    s.update(training=False).forward(s.data(shape))
    out.append(s)

    s = Scenario("flip-momentum-none", "momentum=None: a flip off pauses the average, a flip back continues from the old counter", "BATCH_NORM_1D", momentum=None)
    shape = (6, 3, 4)
    s.forward(s.data(shape)).forward(s.data(shape))
    s.update(track=False).forward(s.data(shape))
    s.update(track=True).forward(s.data(shape)).forward(s.data(shape))
    s.get_state()
    out.append(s)

    s = Scenario("flip-in-eval", "flip off while in eval: buffers still used; training then uses batch stats without updates", "SYNC_BATCH_NORM")
    shape = (5, 3, 3)
    s.forward(s.data(shape)).update(training=False).forward(s.data(shape))
    s.update(track=False).forward(s.data(shape)).forward(s.data((1, 3)))
    s.update(training=True).forward(s.data(shape))
    out.append(s)

    s = Scenario("flip-3d-reset-while-off", "reset_running_stats does nothing while the flag is off", "BATCH_NORM_3D")
    shape = (2, 3, 2, 2, 2)
    s.forward(s.data(shape)).update(track=False).reset_running_stats().reset_parameters()
    s.update(track=True).reset_running_stats()
    out.append(s)
    return out


def affine_eps():
    out = []
    for kind, shape in kind_shapes():
        tag = "{}-{}".format(short(kind), label(shape))
        s = Scenario("affine-off-" + tag, "affine=False: weight and bias are None, w=1 and b=0", kind, affine=False)
        s.forward(s.data(shape)).forward(s.data(shape)).update(training=False).forward(s.data(shape)).get_state()
        out.append(s)

    for eps in (1e-3, 0.1, 0.0):
        s = Scenario("eps-{}".format(eps), "eps={} in training and eval".format(eps), "BATCH_NORM_2D", eps=eps)
        s.load_random_affine()
        s.forward(s.data((4, 3, 2, 3))).forward(s.data((4, 3, 2, 3)))
        s.update(training=False).forward(s.data((4, 3, 2, 3)))
        out.append(s)

    s = Scenario("eps-0-constant-channel", "eps=0, a constant channel in training: invstd is 0 and the output is the bias", "BATCH_NORM_2D", eps=0.0)
    s.load_random_affine()
    x = s.data((4, 3, 2, 2))
    x[:, 1] = 2.5
    s.forward(x)
    out.append(s)

    s = Scenario("eps-0-constant-channel-1d", "eps=0, (N,C) input with a constant channel", "BATCH_NORM_1D", eps=0.0, affine=False)
    x = s.data((5, 3))
    x[:, 0] = -1.0
    s.forward(x)
    out.append(s)

    for rm0, name in [(0.0, "zero-mean"), (0.75, "nonzero-mean")]:
        s = Scenario("eps-0-eval-zero-var-" + name, "eps=0 in eval with running_var 0 on one channel: NaNs and infinities as PyTorch's CPU kernel makes them", "BATCH_NORM_2D", eps=0.0)
        w, b = s.params()
        s.load({"weight": w, "bias": b, "running_mean": torch.tensor([0.1, rm0, -0.2]), "running_var": torch.tensor([1.0, 0.0, 2.0]), "num_batches_tracked": 3})
        s.update(training=False).forward(s.data((3, 3, 2, 2)))
        out.append(s)
    return out


def errors():
    out = []
    ranks = {"BATCH_NORM_1D": [1, 4, 6], "BATCH_NORM_2D": [1, 2, 3, 5, 6], "BATCH_NORM_3D": [1, 4, 6], "SYNC_BATCH_NORM": [0, 1]}
    for kind, bad in ranks.items():
        s = Scenario("error-rank-" + short(kind), "wrong ranks raise before any state changes, in train and eval", kind)
        for r in bad:
            s.forward(s.data(shape_of_rank(r)))
        s.update(training=False)
        for r in bad:
            s.forward(s.data(shape_of_rank(r)))
        out.append(s)

    for kind, shape in [("BATCH_NORM_1D", (1, 3)), ("BATCH_NORM_1D", (1, 3, 1)), ("BATCH_NORM_2D", (1, 3, 1, 1)), ("BATCH_NORM_3D", (1, 3, 1, 1, 1)), ("SYNC_BATCH_NORM", (1, 3))]:
        tag = "{}-{}".format(short(kind), label(shape))
        s = Scenario("error-one-value-" + tag, "one value per channel in training: ValueError, and the counter has already moved", kind)
        s.forward(s.data(shape)).forward(s.data(shape))
        s.forward(s.data((2,) + shape[1:])) if len(shape) > 2 else s.forward(s.data((2, 3)))
        out.append(s)
        s = Scenario("error-one-value-eval-no-buffers-" + tag, "one value per channel in eval without buffers (#156051)", kind, track=False)
        s.update(training=False).forward(s.data(shape))
        out.append(s)
    s = Scenario("error-one-value-1d-long", "(1, C, 2) is legal: each channel sees two values", "BATCH_NORM_1D")
    s.forward(s.data((1, 3, 2)))
    out.append(s)

    s = Scenario("error-channel-mismatch", "a channel count that disagrees with the buffers: RuntimeError after the counter moved", "BATCH_NORM_2D")
    s.forward(s.data((2, 4, 2, 2))).forward(s.data((2, 2, 2, 2)))
    s.update(training=False).forward(s.data((2, 4, 2, 2)))
    out.append(s)

    s = Scenario("error-weight-mismatch", "no buffers but affine: the weight's size is checked", "BATCH_NORM_1D", track=False)
    s.forward(s.data((4, 5))).update(training=False).forward(s.data((4, 2, 3)))
    out.append(s)

    s = Scenario("error-none-checked", "neither buffers nor affine: any channel count passes", "BATCH_NORM_2D", track=False, affine=False)
    s.forward(s.data((2, 5, 2, 2))).update(training=False).forward(s.data((3, 1, 2, 2)))
    out.append(s)

    for name in ("running_mean", "running_var"):
        s = Scenario("error-undefined-" + name, "exactly one buffer None: eval raises '{} must be defined in evaluation mode'; training updates the other".format(name), "BATCH_NORM_2D")
        s.forward(s.data((3, 3, 2, 2))).update(clear=(name,))
        s.forward(s.data((3, 3, 2, 2))).update(training=False).forward(s.data((3, 3, 2, 2)))
        out.append(s)

    s = Scenario("error-order-cleared-mean-wrong-channels", "eval checks buffer by buffer: running_mean missing comes before running_var's size", "BATCH_NORM_2D")
    s.forward(s.data((3, 3, 2, 2))).update(training=False, clear=("running_mean",)).forward(s.data((3, 4, 2, 2)))
    out.append(s)
    s = Scenario("error-order-cleared-var-wrong-channels", "eval checks buffer by buffer: running_mean's size comes before running_var missing", "BATCH_NORM_2D")
    s.forward(s.data((3, 3, 2, 2))).update(training=False, clear=("running_var",)).forward(s.data((3, 4, 2, 2)))
    out.append(s)

    s = Scenario("error-sync-zero-channels", "SyncBatchNorm refuses zero input channels", "SYNC_BATCH_NORM")
    s.forward(s.data((2, 0, 3))).update(training=False).forward(s.data((2, 0)))
    out.append(s)

    s = Scenario("error-load", "load_state_dict errors and their message order", "BATCH_NORM_2D")
    w, b = s.params()
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    s.load({"weight": w, "bias": b, "running_mean": rm, "num_batches_tracked": 2})
    s.load({"weight": torch.ones(4), "bias": b, "running_mean": rm, "running_var": rv, "num_batches_tracked": 2})
    s.load({"weight": torch.ones(4), "bias": b, "running_mean": rm, "running_var": rv}, strict=False)
    s.load({"weight": torch.ones(4), "bias": torch.zeros(2), "running_mean": rm})
    s.load({"weight": w, "bias": b, "running_mean": rm, "running_var": rv})
    s.load({"weight": w, "bias": b, "running_mean": rm, "running_var": rv}, version=1)
    s.get_state()
    out.append(s)

    s = Scenario("error-load-tracking-mismatch", "a tracking dict into a module built without tracking, and back", "BATCH_NORM_1D", track=False)
    w, b = s.params()
    s.load({"weight": w, "bias": b, "running_mean": torch.zeros(3), "running_var": torch.ones(3), "num_batches_tracked": 5})
    s.load({"weight": w, "bias": b, "running_mean": torch.zeros(3), "running_var": torch.ones(3), "num_batches_tracked": 5}, strict=False)
    out.append(s)
    s = Scenario("error-load-missing-buffers", "a dict without buffers into a tracking module", "BATCH_NORM_1D")
    w, b = s.params()
    s.load({"weight": w, "bias": b})
    s.load({"weight": w, "bias": b}, version=None)
    out.append(s)

    s = Scenario("error-reset-no-buffers", "reset with the flag set True on a module built without tracking: AttributeError", "BATCH_NORM_2D", track=False)
    s.update(track=True).reset_running_stats().reset_parameters()
    out.append(s)
    s = Scenario("error-reset-one-buffer-cleared", "reset with running_var None: PyTorch zeroes running_mean, then raises", "BATCH_NORM_2D")
    s.load_random_affine().forward(s.data((3, 3, 2, 2)))
    s.update(clear=("running_var",)).reset_running_stats().reset_parameters()
    out.append(s)
    return out


def empty():
    out = []
    for kind, shape in kind_shapes():
        tag = "{}-{}".format(short(kind), label(shape))
        s = Scenario("empty-" + tag, "an empty batch: empty output, buffers untouched, the counter moves in training", kind)
        zero = (0,) + shape[1:]
        s.forward(s.data(shape)).forward(s.data(zero)).update(training=False).forward(s.data(zero))
        out.append(s)
    s = Scenario("empty-spatial", "a spatial size of 0, and a wrong channel count that an empty input does not reveal", "BATCH_NORM_2D")
    s.forward(s.data((2, 3, 0, 4))).forward(s.data((0, 5, 2, 2))).update(training=False).forward(s.data((2, 7, 0, 1)))
    out.append(s)
    s = Scenario("empty-no-buffers", "empty input on a module without buffers, train and eval", "BATCH_NORM_1D", track=False)
    s.forward(s.data((0, 3))).update(training=False).forward(s.data((0, 3, 4)))
    out.append(s)
    s = Scenario("empty-sync-one-spatial-zero", "SyncBatchNorm with an empty trailing dimension", "SYNC_BATCH_NORM")
    s.forward(s.data((3, 3, 0))).forward(s.data((3, 3, 2)))
    out.append(s)
    return out


def state_dict():
    out = []
    for name, kw in [("default", {}), ("affine-off", {"affine": False}), ("tracking-off", {"track": False}), ("momentum-none", {"momentum": None})]:
        for kind in ("BATCH_NORM_2D", "SYNC_BATCH_NORM"):
            s = Scenario("state-{}-{}".format(name, short(kind)), "state_dict keys and values: " + name, kind, **kw)
            shape = (3, 3, 2, 2)
            s.get_state().forward(s.data(shape)).get_state()
            out.append(s)

    s = Scenario("state-after-clear", "a cleared buffer leaves the state_dict", "BATCH_NORM_2D")
    s.forward(s.data((2, 3, 2, 2))).update(clear=("running_mean",)).get_state().update(clear=("num_batches_tracked",)).get_state()
    out.append(s)

    s = Scenario("state-non-strict", "non-strict loads return the missing and unexpected keys", "BATCH_NORM_1D")
    w, b = s.params()
    s.load({"weight": w}, strict=False)
    s.load({"running_var": torch.rand(3) + 1, "num_batches_tracked": 9}, strict=False)
    s.update(clear=("running_mean",))
    s.load({"running_mean": torch.zeros(3), "bias": b}, strict=False)
    s.get_state()
    out.append(s)

    for version in (1, None):
        s = Scenario("state-old-checkpoint-v{}".format(version), "a dict from before version 2 without the counter sets it to 0", "BATCH_NORM_2D")
        shape = (3, 3, 2, 2)
        for _ in range(3):
            s.forward(s.data(shape))
        w, b = s.params()
        s.load({"weight": w, "bias": b, "running_mean": torch.randn(3), "running_var": torch.rand(3) + 0.5}, version=version)
        s.get_state()
        s.load({"weight": w, "bias": b, "running_mean": torch.randn(3), "running_var": torch.rand(3) + 0.5, "num_batches_tracked": 11}, version=version)
        s.get_state()
        out.append(s)

    s = Scenario("state-old-checkpoint-flag-off", "the version hook reads the flag at load time: flipped off, no counter is inserted", "BATCH_NORM_2D")
    s.forward(s.data((3, 3, 2, 2))).update(track=False)
    w, b = s.params()
    s.load({"weight": w, "bias": b, "running_mean": torch.randn(3), "running_var": torch.rand(3) + 0.5}, version=1)
    s.load({"weight": w, "bias": b, "running_mean": torch.randn(3), "running_var": torch.rand(3) + 0.5}, version=1, strict=False)
    s.get_state()
    out.append(s)

    s = Scenario("state-old-checkpoint-flipped-on", "no counter buffer but the flag True: the inserted counter is an unexpected key", "BATCH_NORM_1D", track=False)
    s.update(track=True)
    w, b = s.params()
    s.load({"weight": w, "bias": b}, version=None)
    s.load({"weight": w, "bias": b}, version=None, strict=False)
    out.append(s)

    s = Scenario("state-v2-with-counter", "a full version-2 dict, then the resets", "BATCH_NORM_3D")
    w, b = s.params()
    s.load({"weight": w, "bias": b, "running_mean": torch.randn(3), "running_var": torch.rand(3) + 0.5, "num_batches_tracked": 7})
    s.get_state().forward(s.data((2, 3, 2, 2, 2))).reset_running_stats().get_state().reset_parameters().get_state()
    out.append(s)
    return out


def precision():
    out = []
    cases = [
        ("mean-1000-std-0.01", 1000.0, 0.01),
        ("mean-100-std-0.1", 100.0, 0.1),
        ("mean-minus-300-std-0.001", -300.0, 0.001),
        ("control-n01", 0.0, 1.0),
    ]
    for name, offset, spread in cases:
        s = Scenario("precision-" + name, "large mean, tiny spread: checked against PyTorch's float64 result", "BATCH_NORM_2D", num_features=4, precision=True)
        shape = (16, 4, 8, 16)
        s.forward(s.data(shape, offset, spread)).forward(s.data(shape, offset, spread))
        s.update(training=False).forward(s.data(shape, offset, spread))
        out.append(s)
    s = Scenario("precision-1d-mean-1000", "(N, C) input with mean 1000, std 0.01", "BATCH_NORM_1D", num_features=4, precision=True)
    s.forward(s.data((2048, 4), 1000.0, 0.01)).update(training=False).forward(s.data((512, 4), 1000.0, 0.01))
    out.append(s)
    return out


def backward():
    out = []
    for kind, shape in kind_shapes():
        tag = "{}-{}".format(short(kind), label(shape))
        for affine in (True, False):
            a = "" if affine else "-affine-off"
            s = Scenario("backward-" + tag + a, "gradients with batch statistics (train), running statistics (eval) and batch statistics in eval without buffers", kind, affine=affine)
            s.load_random_affine()
            s.forward(s.data(shape), save=True).backward(s.data(shape))
            s.update(training=False).forward(s.data(shape), save=True).backward(s.data(shape))
            s.update(track=False).forward(s.data(shape), save=True).backward(s.data(shape))
            out.append(s)
        s = Scenario("backward-no-buffers-" + tag, "built without tracking: batch statistics in train and eval", kind, track=False)
        s.load_random_affine()
        s.forward(s.data(shape), save=True).backward(s.data(shape))
        s.update(training=False).forward(s.data(shape), save=True).backward(s.data(shape))
        out.append(s)

    s = Scenario("backward-large-nc", "(N, C) with many rows, where PyTorch's CPU kernel sums in float32: checked against float64", "BATCH_NORM_1D", num_features=8, precision=True)
    s.load_random_affine()
    s.forward(s.data((4096, 8)), save=True).backward(s.data((4096, 8)))
    out.append(s)

    s = Scenario("backward-eps-0-constant-channel", "eps=0 and a constant channel: zero input and weight gradients on it", "BATCH_NORM_2D", eps=0.0)
    s.load_random_affine()
    x = s.data((3, 3, 2, 2))
    x[:, 2] = 1.25
    s.forward(x, save=True).backward(s.data((3, 3, 2, 2)))
    out.append(s)

    s = Scenario("backward-empty", "an empty batch: empty grad_input, zero parameter gradients", "BATCH_NORM_2D")
    s.forward(s.data((0, 3, 2, 2)), save=True).backward(s.data((0, 3, 2, 2)))
    s.update(training=False).forward(s.data((2, 3, 0, 2)), save=True).backward(s.data((2, 3, 0, 2)))
    out.append(s)

    s = Scenario("backward-shape-mismatch", "a grad_output whose shape differs from the output's", "BATCH_NORM_2D")
    s.forward(s.data((2, 3, 2, 2)), save=True).backward(s.data((2, 3, 2, 3))).backward(s.data((2, 3, 2, 2)))
    out.append(s)

    s = Scenario("backward-momentum-none-steps", "several saved forwards and backwards with momentum=None", "BATCH_NORM_3D", momentum=None)
    s.load_random_affine()
    for _ in range(3):
        s.forward(s.data((2, 3, 2, 2, 2)), save=True).backward(s.data((2, 3, 2, 2, 2)))
    out.append(s)
    return out


class SyncScenario:
    """A SyncBatchNorm group of len(shards) ranks, checked against BatchNorm over the concatenated
    batch (which is what every rank must get), or against each rank on its own where the group does
    not sync (eval with running statistics; PyTorch 1.9's rule in eval)."""

    def __init__(self, sid, description, world_size, num_features=3, eps=1e-5, momentum=0.1, affine=True, track=True, rule="SYNC_WHEN_BATCH_STATS"):
        self.id = sid
        self.description = description
        self.world_size = world_size
        self.rule = rule
        self.config = config_of(num_features, eps, momentum, affine, track, world_size=world_size, sync_rule=rule)
        torch.manual_seed(BASE_SEED + zlib.crc32(sid.encode()))
        self.m = SyncBatchNorm(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
        self.initial = state_of(self.m)
        self.steps = []
        self.step_no = 0

    data = Scenario.data
    params = Scenario.params

    def load_random_affine(self):
        if self.config["affine"]:
            w, b = self.params()
            self.m.load_state_dict({"weight": w, "bias": b}, strict=False)
            self.initial = state_of(self.m)
        return self

    def update(self, training=None, track=None):
        step = {"op": "update"}
        if training is not None:
            self.m.train(training)
            step["training"] = training
        if track is not None:
            self.m.track_running_stats = track
            step["track_running_stats"] = track
        step["expect"] = {}
        step["after"] = state_of(self.m)
        self.steps.append(step)
        return self

    def syncs(self):
        m = self.m
        bn_training = m.training or (m.running_mean is None and m.running_var is None)
        return bn_training and (self.rule == "SYNC_WHEN_BATCH_STATS" or m.training)

    def step(self, shards, grads=None):
        m = self.m
        eps = self.config["eps"]
        step = {"op": "step", "step": self.step_no, "shards": [enc(x) for x in shards]}
        self.step_no += 1
        if grads is not None:
            step["grad_outputs"] = [enc(g) for g in grads]
        expect = {"synced": self.syncs()}
        before = copy.deepcopy(m)
        for p in m.parameters():
            p.grad = None
        if expect["synced"]:
            xs = [x.clone().requires_grad_(True) for x in shards]
            cat = torch.cat(xs, 0)
            try:
                y = m(cat)
            except Exception as e:  # noqa: BLE001
                expect["error"] = error_of(e)
                # normserve changes nothing when the group's batch has one value per channel.
                step["torch_after"] = state_of(m)
                self.m = before
                step["expect"] = expect
                step["after"] = state_of(self.m)
                self.steps.append(step)
                return self
            sizes = [x.shape[0] for x in shards]
            expect["outputs"] = [enc(o) for o in torch.split(y.detach(), sizes, 0)]
            c64 = torch.cat([x.double() for x in shards], 0)
            dims = [0] + list(range(2, c64.dim()))
            count = c64.numel() // c64.shape[1] if c64.shape[1] else 0
            expect["count"] = count
            if count > 0:
                mean = c64.mean(dims)
                var = c64.var(dims, unbiased=False)
                invstd = torch.where((var == 0) & (eps == 0), torch.zeros_like(var), 1 / torch.sqrt(var + eps))
                expect["mean"], expect["var"], expect["invstd"] = enc(mean), enc(var), enc(invstd)
            if grads is not None:
                y.backward(torch.cat(grads, 0))
                expect["grad_inputs"] = [enc(x.grad) for x in xs]
                if m.affine:
                    expect["grad_weight_total"] = enc(m.weight.grad)
                    expect["grad_bias_total"] = enc(m.bias.grad)
                    view = [1, -1] + [1] * (c64.dim() - 2)
                    pw, pb = [], []
                    for x, g in zip(shards, grads):
                        g64 = g.double()
                        if count > 0 and x.numel() > 0:
                            xhat = (x.double() - mean.view(view)) * invstd.view(view)
                            d = [0] + list(range(2, x.dim()))
                            pw.append(enc((g64 * xhat).sum(d)))
                            pb.append(enc(g64.sum(d)))
                        else:
                            pw.append(enc(torch.zeros(x.shape[1], dtype=torch.float64)))
                            pb.append(enc(torch.zeros(x.shape[1], dtype=torch.float64)))
                    expect["grad_weight"], expect["grad_bias"] = pw, pb
        else:
            outs, gins, pw, pb = [], [], [], []
            for i, x in enumerate(shards):
                x = x.clone().requires_grad_(True)
                for p in m.parameters():
                    p.grad = None
                y = m(x)
                outs.append(enc(y.detach()))
                if grads is not None:
                    y.backward(grads[i])
                    gins.append(enc(x.grad))
                    if m.affine:
                        pw.append(enc(m.weight.grad.double()))
                        pb.append(enc(m.bias.grad.double()))
            expect["outputs"] = outs
            if grads is not None:
                expect["grad_inputs"] = gins
                if m.affine:
                    expect["grad_weight"], expect["grad_bias"] = pw, pb
        step["expect"] = expect
        step["after"] = state_of(m)
        self.steps.append(step)
        return self

    def to_json(self):
        return {
            "id": self.id,
            "description": self.description,
            "kind": "SYNC_BATCH_NORM",
            "config": self.config,
            "initial": self.initial,
            "steps": self.steps,
        }


def sync():
    out = []

    def shards_for(s, sizes, tail):
        return [s.data((n,) + tail) for n in sizes]

    cases = [
        (2, [3, 5], (3,), "bn1d-nc"),
        (3, [4, 0, 2], (3, 5), "bn1d-ncl-empty-rank"),
        (4, [2, 3, 1, 2], (3, 3, 2), "bn2d"),
        (3, [1, 2, 0], (3, 2, 2, 2), "bn3d-empty-rank"),
        (2, [1, 1], (3,), "single-sample-ranks"),
    ]
    for world, sizes, tail, tag in cases:
        s = SyncScenario("sync-{}-ranks-{}".format(world, tag), "training steps and eval over {} ranks with shards of {} samples".format(world, sizes), world)
        s.load_random_affine()
        for _ in range(3):
            s.step(shards_for(s, sizes, tail), shards_for(s, sizes, tail))
        s.update(training=False)
        s.step(shards_for(s, sizes, tail), shards_for(s, sizes, tail))
        out.append(s)

    s = SyncScenario("sync-momentum-none", "momentum=None over several group steps: one update per step", 3, momentum=None)
    for _ in range(5):
        s.step(shards_for(s, [2, 4, 3], (3, 2)), shards_for(s, [2, 4, 3], (3, 2)))
    out.append(s)

    for rule in ("SYNC_WHEN_BATCH_STATS", "SYNC_WHEN_TRAINING"):
        tag = "44445" if rule == "SYNC_WHEN_BATCH_STATS" else "1.9"
        s = SyncScenario("sync-tracking-off-rule-" + tag, "no buffers: training syncs; eval syncs under PR #44445 and not under 1.9", 2, track=False, rule=rule)
        s.load_random_affine()
        s.step(shards_for(s, [3, 2], (3, 2)), shards_for(s, [3, 2], (3, 2)))
        s.update(training=False)
        s.step(shards_for(s, [3, 2], (3, 2)), shards_for(s, [3, 2], (3, 2)))
        out.append(s)

    s = SyncScenario("sync-flag-flipped-off", "tracking flipped off at runtime: the group trains on pooled statistics, buffers frozen; eval uses them", 2)
    s.step(shards_for(s, [3, 3], (3, 2)))
    s.update(track=False)
    s.step(shards_for(s, [2, 4], (3, 2)), shards_for(s, [2, 4], (3, 2)))
    s.update(training=False)
    s.step(shards_for(s, [2, 4], (3, 2)))
    out.append(s)

    s = SyncScenario("sync-affine-off", "affine=False: no parameter gradients", 3, affine=False)
    s.step(shards_for(s, [2, 1, 3], (3, 2, 2)), shards_for(s, [2, 1, 3], (3, 2, 2)))
    s.step(shards_for(s, [2, 1, 3], (3, 2, 2)), shards_for(s, [2, 1, 3], (3, 2, 2)))
    out.append(s)

    s = SyncScenario("sync-all-empty", "every rank empty: empty outputs, the counter moves, the buffers stay", 2)
    s.step(shards_for(s, [3, 2], (3, 2)))
    s.step(shards_for(s, [0, 0], (3, 2)), shards_for(s, [0, 0], (3, 2)))
    s.step(shards_for(s, [2, 2], (3, 2)))
    out.append(s)

    s = SyncScenario("sync-global-count-one", "one value per channel in the whole group: every rank gets the error, nothing changes", 3)
    s.step(shards_for(s, [2, 2, 2], (3,)))
    s.step(shards_for(s, [0, 1, 0], (3,)))
    s.step(shards_for(s, [1, 0, 1], (3,)))
    out.append(s)

    s = SyncScenario("sync-eps-0-constant", "eps=0 and a channel constant across the whole group", 2, eps=0.0)
    s.load_random_affine()
    a, b = s.data((2, 3, 2)), s.data((3, 3, 2))
    a[:, 1] = 0.5
    b[:, 1] = 0.5
    s.step([a, b], [s.data((2, 3, 2)), s.data((3, 3, 2))])
    out.append(s)
    return out


GROUPS = {
    "truth-table": truth_table,
    "momentum": momentum,
    "flag-flip": flag_flip,
    "affine-eps": affine_eps,
    "errors": errors,
    "empty": empty,
    "state-dict": state_dict,
    "precision": precision,
    "backward": backward,
    "sync": sync,
}


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT_DIR, exist_ok=True)
    for group, build in GROUPS.items():
        scenarios = build()
        ids = [s.id for s in scenarios]
        assert len(ids) == len(set(ids)), "duplicate scenario ids in " + group
        path = os.path.join(OUT_DIR, group + ".json")
        with open(path, "w") as f:
            head = {"generator": "scripts/make_golden.py", "torch_version": torch.__version__, "group": group}
            f.write(json.dumps(head, separators=(",", ":"))[:-1] + ',"scenarios":[\n')
            f.write(",\n".join(json.dumps(s.to_json(), separators=(",", ":")) for s in scenarios))
            f.write("\n]}\n")
        steps = sum(len(s.steps) for s in scenarios)
        print("{}: {} scenarios, {} steps, {} bytes".format(path, len(scenarios), steps, os.path.getsize(path)), file=sys.stderr)


if __name__ == "__main__":
    main()
