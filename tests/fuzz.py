"""A random sweep of tritonrnn, beyond the fixed cases of the tests (a script; tests/test_fuzz.py runs a few of its
configurations so that it cannot rot).

    python tests/fuzz.py --seed 1 --minutes 20               # against torch.nn holding the same weights
    python tests/fuzz.py --seed 1 --minutes 20 --concurrent  # several programs a layer at once: step by step's bits
    python tests/fuzz.py --replay '{"kind": "module", ...}'  # one configuration again, as printed on a failure

Each configuration is a JSON dict drawn from the seed: the LSTM/GRU/RNN modules (layers, bias, batch_first,
bidirectional, proj_size, dropout) or a StackedRNN (mixed or equal cells, residual, all-layer outputs), batched,
unbatched or packed input of random lengths, initial states or none, a dtype, and the switches TRITONRNN_WAVEFRONT
and TRITONRNN_EXCHANGE. Every buffer the kernels fill starts as NaN.

Against torch.nn (the default; CPU under the interpreter, or a GPU): torch.nn modules hold the same weights in
float64; outputs, final states and the gradients of the input, the initial states and every parameter must agree
to the tests' tolerances (helpers.TOLERANCE) or within 3x torch.nn's own error in that dtype on the same inputs
(TORCH_FACTOR, the GPU tier's rule against cuDNN), and the step must run on the kernels (a fallback to the reference or
to torch.nn fails it). With dropout in training (torch.nn's masks are its own) the expected values come from a
float64 copy of the model on the fallback (torch's own op on the CPU, the reference on a GPU), which draws the
kernels' masks. A failure in a reduced precision is run again in the most precise dtype the kernels have (float64
on the CPU, float32 on a GPU): if that passes, it is reported as "precision only", to be looked at (a relu
pre-activation within rounding of 0 flips that unit's derivative, say), not as a proven bug.

--concurrent (CPU only): a training step (dropout in both modes) runs with block_h=16 (2-3 programs a layer) launched
one step at a time, then persistent under concurrent_interpreter.programs_at_once: a random scheduler seed and
hand-over probability, weak stores at random, two batch groups in some module cases, in some 16 or 32 rows of
W_hh held and the rest streamed, in some 32-row batch tiles, and in some the barrier counter's limit lowered so that
a layer takes several launches. Outputs, states and gradients must be the step-by-step run's bit for bit and NaN-free.

On a GPU the sweep also draws GPU sizes (H up to 768, B up to 100: several programs, batch groups, rows streamed),
names each configuration before it runs (one that hangs is killed from outside), and stops at a CUDA error that loses
the context.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

# The repository root, where perf/ (which conftest imports) lies, as pytest's pythonpath has it.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from conftest import DEVICE, FALLBACK_PHRASES  # noqa: E402  (first of ours: sets TRITON_INTERPRET before triton)
from helpers import TOLERANCE, rel_err  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence  # noqa: E402

import tritonrnn  # noqa: E402
from tritonrnn import _plan, layer_op, layer_run  # noqa: E402

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
# The kernels' dtypes here: float64 exists on the CPU paths only.
DTYPES = ["float64", "float32"] if DEVICE.type == "cpu" else ["float32", "bfloat16", "float16"]
MOST_PRECISE = DTYPES[0]
# A result within this factor of torch.nn's own error in the same dtype passes (the GPU tier's bound against cuDNN for
# relu RNNs, whose kinks make the gradients as ill-conditioned as a bias of two units with cancellation).
TORCH_FACTOR = 3.0


def draw(rng: random.Random, concurrent: bool = False) -> dict:
    """One random configuration (plain JSON values, so that a failure can be replayed)."""
    hidden_sizes = [17, 20, 33, 40, 47] if concurrent else [1, 2, 3, 5, 8, 17, 33]
    dtypes = ["float64", "float32", "bfloat16"] if concurrent else DTYPES
    steps = rng.randint(1, 6 if concurrent else 8)
    if DEVICE.type == "cuda":  # what only a GPU plans: several programs and batch groups, rows streamed, wide tiles
        hidden_sizes += [100, 256, 768]
        batch = rng.choice([1, 2, 3, 5, 6, 16, 40, 100])
    else:  # as drawn before the GPU sizes: a seed's configurations stay those its sweeps reported
        batch = rng.choice([1, 2, 3, 5, 20]) if concurrent else rng.randint(1, 6)
    config = {
        "kind": "stack" if rng.random() < 0.35 else "module",
        "steps": steps,
        "batch": batch,
        "form": rng.choice(["batched", "batched", "batched", "unbatched", "packed"]),
        "states": rng.random() < 0.5,
        "bias": rng.random() < 0.8,
        "batch_first": rng.random() < 0.3,
        "bidirectional": rng.random() < 0.3,
        "dtype": rng.choice(dtypes),
        "wavefront": rng.choice(["0", "0", "fused", "2"]),
        "exchange": rng.choice(["barrier", "tagged"]),
        "data_seed": rng.randrange(2**31),
    }
    if config["form"] == "packed":
        config["lengths"] = [rng.randint(1, steps) for _ in range(batch)]
        config["lengths"][rng.randrange(batch)] = steps
        config["enforce_sorted"] = rng.random() < 0.3
        if config["enforce_sorted"]:
            config["lengths"].sort(reverse=True)
    if config["kind"] == "module":
        cell = rng.choice(CELLS)
        hidden = rng.choice(hidden_sizes)
        layers = rng.randint(1, 3)
        config.update(cell=cell, input_size=rng.randint(1, 12), hidden=hidden, layers=layers)
        config["proj_size"] = rng.randint(1, hidden - 1) if cell == "lstm" and hidden > 1 and rng.random() < 0.25 else 0
        config["dropout"] = rng.choice([0.0, 0.0, 0.3]) if layers > 1 else 0.0
    else:
        n_layers = rng.randint(2, 4)
        if rng.random() < 0.5:  # equal layers: the fused stack kernel's case
            layers = [[rng.choice(CELLS), rng.choice(hidden_sizes)]] * n_layers
        else:
            layers = [[rng.choice(CELLS), rng.choice(hidden_sizes)] for _ in range(n_layers)]
        directions = 2 if config["bidirectional"] else 1
        residual = len({h for _, h in layers}) == 1 and rng.random() < 0.4
        config.update(layers=layers, residual=residual, return_all=rng.random() < 0.5)
        config["input_size"] = directions * layers[0][1] if residual else rng.randint(1, 12)
        config["dropout"] = rng.choice([0.0, 0.0, 0.3])
        config["dropout_mode"] = rng.choice(["standard", "variational"])
    if concurrent:
        config["training"] = True
        config["sched_seed"] = rng.randrange(2**31)
        config["switch_probability"] = rng.choice([0.05, 0.1, 0.3])
        config["weak_stores"] = rng.random() < 0.5
        plain_module = config["kind"] == "module" and config["wavefront"] == "0" and not config["proj_size"]
        config["batch_groups"] = 2 if plain_module and batch > 16 and rng.random() < 0.5 else 1
        config["max_arrivals"] = 40 if rng.random() < 0.2 else 0
        config["dropout_mode"] = rng.choice(["standard", "variational"])
        config["weight_drop"] = rng.choice([0.0, 0.0, 0.2]) if config["kind"] == "stack" else 0.0
        # Units a program: the GPU heuristics' two widths (_plan.heuristic_width), 32 where a layer then still
        # splits into several programs.
        widest = max([config["hidden"]] if config["kind"] == "module" else [h for _, h in config["layers"]])
        config["block_h"] = 32 if widest > 32 and rng.random() < 0.5 else 16
        # The reduction in chunks (kernels/recurrent._dot_k; every kernel: the single layer's, the projection's, the
        # stack's). Drawn from its own generator: the configurations a seed drew before stay the same.
        config["k_split"] = random.Random(config["sched_seed"]).choice([1, 1, 2, 4, 8])
        # W_hh's rows a program holds, the rest read every step in 16-row chunks (the GPU's plan at large H; with a
        # projection over P forward, over H backward); 0: all. Its own generator as well.
        config["held_rows"] = random.Random(config["sched_seed"] + 1).choice([0, 0, 0, 16, 32])
        # 32-row batch tiles (the tuner's candidates, in chunks too) in some with one batch group. Its own generator.
        if config["batch_groups"] == 1:
            config["block_b"] = random.Random(config["sched_seed"] + 2).choice([16, 16, 16, 32])
    else:
        # With dropout in training the check is against the float64 reference run of the same model, which draws
        # the kernels' masks (torch.nn's are its own).
        config["training"] = config["dropout"] == 0.0 or rng.random() < 0.5
        if config["kind"] == "module" and config["training"] and config["dropout"]:
            config["dropout_mode"] = rng.choice(["standard", "variational"])
    # Each output and final state left out of the loss with this probability: backward then gets no gradient for it.
    config["loss_drop"] = rng.choice([0.0, 0.0, 0.5])
    # Each parameter frozen (requires_grad False) with this probability, and the input with or without grad: the
    # backward skips what wants no gradient. Their own generator: the configurations a seed drew before stay the same.
    frozen = random.Random(config["data_seed"] + 5)
    config["frozen"] = frozen.choice([0.0, 0.0, 0.3, 0.7])
    config["input_grad"] = frozen.random() < 0.7
    return config


# --- building the models --------------------------------------------------------------------------------------


def _torch_layer(cell: str, input_size: int, hidden: int, **kwargs) -> nn.Module:
    if cell.startswith("rnn"):
        return nn.RNN(input_size, hidden, nonlinearity=cell.split("_")[1], **kwargs)
    return {"lstm": nn.LSTM, "gru": nn.GRU}[cell](input_size, hidden, **kwargs)


def build(config: dict) -> tuple[nn.Module, list[tuple[nn.Module, dict[str, str]]]]:
    """tritonrnn's model in the config's dtype, and the torch.nn modules (float64) holding its weights: one module,
    or one a layer for a stack, each with the names of ours its parameters copy."""
    torch.manual_seed(config["data_seed"])
    dtype = getattr(torch, config["dtype"])
    common = dict(bias=config["bias"], batch_first=config["batch_first"], bidirectional=config["bidirectional"])
    if config["kind"] == "module":
        kwargs = dict(common, num_layers=config["layers"], dropout=config["dropout"])
        if config["proj_size"]:
            kwargs["proj_size"] = config["proj_size"]
        mode = dict(dropout_mode=config["dropout_mode"]) if "dropout_mode" in config else {}  # torch.nn has none
        ours = _our_module(config["cell"], config["input_size"], config["hidden"], dict(kwargs, **mode))
        theirs = _torch_layer(config["cell"], config["input_size"], config["hidden"], **kwargs)
        pairs = [(theirs, {name: name for name, _ in theirs.named_parameters()})]
    else:
        ours = tritonrnn.StackedRNN(
            config["input_size"], [tuple(layer) for layer in config["layers"]], dropout=config["dropout"],
            dropout_mode=config["dropout_mode"], residual=config["residual"],
            weight_drop=config.get("weight_drop", 0.0), **common,
        )  # fmt: skip
        pairs, size = [], config["input_size"]
        for index, (cell, hidden) in enumerate(config["layers"]):
            theirs = _torch_layer(cell, size, hidden, **common)
            names = {name: f"layers.{index}.{name.replace('_l0', '')}" for name, _ in theirs.named_parameters()}
            pairs.append((theirs, names))
            size = hidden * (2 if config["bidirectional"] else 1)
    ours = ours.to(DEVICE, dtype).train(config["training"])
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for theirs, names in pairs:
            theirs.to(DEVICE, torch.float64).train(config["training"])
            for name, p in theirs.named_parameters():
                p.copy_(mine[names[name]])
    return ours, pairs


def _our_module(cell: str, input_size: int, hidden: int, kwargs: dict) -> nn.Module:
    if cell.startswith("rnn"):
        return tritonrnn.RNN(input_size, hidden, nonlinearity=cell.split("_")[1], **kwargs)
    return {"lstm": tritonrnn.LSTM, "gru": tritonrnn.GRU}[cell](input_size, hidden, **kwargs)


def _state_shapes(config: dict) -> list[list[tuple[int, ...]]]:
    """Per layer of states (one entry for a module), the shapes of (h,) or (h, c)."""
    D = 2 if config["bidirectional"] else 1
    lead = (config["batch"],) if config["form"] != "unbatched" else ()
    if config["kind"] == "module":
        h_size = config["proj_size"] or config["hidden"]
        shapes = [(D * config["layers"], *lead, h_size)]
        if config["cell"] == "lstm":
            shapes.append((D * config["layers"], *lead, config["hidden"]))
        return [shapes]
    return [[(D, *lead, hidden)] * (2 if cell == "lstm" else 1) for cell, hidden in config["layers"]]


def inputs(config: dict) -> tuple[torch.Tensor, list[list[torch.Tensor]] | None]:
    """The input (padded for packed configs: [B, T, F] if batch_first else [T, B, F]; [T, F] unbatched) and the
    initial states (None: not given), float64."""
    gen = torch.Generator().manual_seed(config["data_seed"] + 1)
    T, B, F = config["steps"], config["batch"], config["input_size"]
    if config["form"] == "unbatched":
        shape = (T, F)
    else:
        shape = (B, T, F) if config["batch_first"] else (T, B, F)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    states = None
    if config["states"]:
        shapes = _state_shapes(config)
        states = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in layer] for layer in shapes]
    return x, states


# --- one step -------------------------------------------------------------------------------------------------


def _pack(config: dict, x: torch.Tensor):
    if config["form"] != "packed":
        return x
    return pack_padded_sequence(x, torch.tensor(config["lengths"]), batch_first=config["batch_first"],
                                enforce_sorted=config["enforce_sorted"])  # fmt: skip


def _data(y) -> torch.Tensor:
    return y.data if isinstance(y, PackedSequence) else y


def _as_arg(layer_states: list[torch.Tensor]):
    return tuple(layer_states) if len(layer_states) == 2 else layer_states[0]


def _flat(states) -> list[torch.Tensor]:
    return [t for s in states for t in (s if isinstance(s, tuple) else (s,))]


def step(config: dict, model: nn.Module, torch_layers=None) -> tuple[list[torch.Tensor], list[str]]:
    """One forward and backward pass of ``model`` (tritonrnn's), or with ``torch_layers`` of the torch.nn modules
    composed as the config says, in float64. Returns the results (outputs, final states, then the gradients of the
    input, the initial states and ours' parameters, in ours' order) and their names."""
    x, states = inputs(config)
    dtype = torch.float64 if torch_layers is not None else getattr(torch, config["dtype"])
    x = x.to(DEVICE, dtype).requires_grad_(config.get("input_grad", True))  # configs drawn before: with grad
    states = [[s.to(DEVICE, dtype).requires_grad_() for s in layer] for layer in states] if states else None
    if torch_layers is None:
        params = list(model.named_parameters())
    else:
        params = [(ours_name, p) for theirs, names in torch_layers for name, p in theirs.named_parameters()
                  for ours_name in [names[name]]]  # fmt: skip
        order = [name for name, _ in model.named_parameters()]
        params.sort(key=lambda item: order.index(item[0]))
    frozen = random.Random(config["data_seed"] + 6)  # the same parameters in both runs (ours' names, sorted)
    for _, parameter in sorted(params, key=lambda item: item[0]):
        parameter.requires_grad_(frozen.random() >= config.get("frozen", 0.0))
    torch.manual_seed(config["data_seed"] + 2)  # dropout's masks, in training
    if torch_layers is None:
        if config["kind"] == "module":
            out, final = model(_pack(config, x), _as_arg(states[0]) if states else None)
            outs, final = [out], [final]
        else:
            outs, final = model(_pack(config, x), [_as_arg(s) for s in states] if states else None,
                                return_all_layers=config["return_all"])  # fmt: skip
            outs = outs if config["return_all"] else [outs]
    else:
        y, outs, final = _pack(config, x), [], []
        for index, (theirs, _) in enumerate(torch_layers):
            below = y
            y, state = theirs(y, _as_arg(states[index]) if states else None)
            if config["kind"] == "stack" and config["residual"]:
                y = _add(y, below)
            outs.append(y)
            final.append(state)
        if config["kind"] == "module" or not config["return_all"]:
            outs = outs[-1:]
    results = [_data(y) for y in outs] + _flat(final)
    names = [f"output{k}" for k in range(len(outs))] + [f"state{k}" for k in range(len(results) - len(outs))]
    gen = torch.Generator().manual_seed(config["data_seed"] + 3)
    cotangents = [torch.randn(r.shape, dtype=torch.float64, generator=gen).to(DEVICE) for r in results]
    in_loss = [True] * len(results)
    if config.get("loss_drop"):  # configs drawn before the key existed have every result in the loss
        pick = torch.Generator().manual_seed(config["data_seed"] + 4)
        in_loss = (torch.rand(len(results), generator=pick) >= config["loss_drop"]).tolist()
        in_loss[int(torch.randint(len(results), (1,), generator=pick))] = True  # at least one
    loss = sum((r.double() * c).sum() for r, c, used in zip(results, cotangents, in_loss) if used)
    initial = [t for layer in states or [] for t in layer]
    leaves = [("input", x), *[(f"h0.{k}", s) for k, s in enumerate(initial)], *params]
    leaves = [(name, leaf) for name, leaf in leaves if leaf.requires_grad]
    wanted = [leaf for _, leaf in leaves]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if loss.requires_grad else [None] * len(wanted)
    for (name, leaf), grad in zip(leaves, grads):
        results.append(torch.zeros_like(leaf) if grad is None else grad)
        names.append(f"grad {name}")
    return [r.detach() for r in results], names


def _add(y, x):
    if isinstance(y, PackedSequence):
        return y._replace(data=y.data + x.data)
    return y + x


class _Fallbacks(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record):
        self.seen.append(record.getMessage())


@contextlib.contextmanager
def switches(config: dict):
    """The config's TRITONRNN_WAVEFRONT and TRITONRNN_EXCHANGE set around the block; yields the problems list with
    the fallbacks (to the reference or torch.nn) logged inside added once it ends. A fused stack declined is not one:
    that is what TRITONRNN_WAVEFRONT=fused does with a stack it cannot fuse."""
    saved = {key: os.environ.get(key) for key in ("TRITONRNN_WAVEFRONT", "TRITONRNN_EXCHANGE")}
    os.environ["TRITONRNN_WAVEFRONT"] = config["wavefront"]
    os.environ["TRITONRNN_EXCHANGE"] = config["exchange"]
    handler = _Fallbacks()
    logging.getLogger("tritonrnn").addHandler(handler)
    _plan._logged.clear()  # log_once logs each message once per process: every configuration's fallbacks are seen
    problems: list[str] = []
    try:
        yield problems
    finally:
        logging.getLogger("tritonrnn").removeHandler(handler)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    problems += [f"fell back: {m}" for m in handler.seen if any(p in m for p in FALLBACK_PHRASES) and
                 "layer by layer" not in m]  # fmt: skip


def reference_step(config: dict, model: nn.Module) -> list[torch.Tensor]:
    """``step`` of a float64 copy of ``model`` on the fallback (torch's op on the CPU, the reference on a GPU), with the
    same dropout seeds (so the kernels' masks): the layers' plans say the kernels cannot hold them, and the kernels'
    launcher is taken away."""
    model = copy.deepcopy(model).double()
    saved = layer_op.plan_layer, layer_run.LayerRun.__init__
    layer_op.plan_layer = lambda *args: "the sweep's reference run"
    layer_run.LayerRun.__init__ = None  # the kernels must not be reached
    try:
        with switches(dict(config, wavefront="0")):  # its fallbacks are its purpose: their problems are dropped
            return step(dict(config, dtype="float64"), model)[0]
    finally:
        layer_op.plan_layer, layer_run.LayerRun.__init__ = saved


def run_config(config: dict, bounds: dict[str, float] | None = None) -> list[str]:
    """The problems of one configuration against torch.nn, or with dropout in training against the reference
    (empty: it passed). ``bounds``: the relative error allowed per result, where not the dtype's tolerance."""
    against_reference = config["training"] and config["dropout"] > 0
    with switches(config) as problems:
        ours, torch_layers = build(config)
        actual, names = step(config, ours)
        if not against_reference:
            expected, _ = step(config, ours, torch_layers)
    if against_reference:  # outside: its fallbacks are not this run's
        expected = reference_step(config, ours)
    tolerance = TOLERANCE[getattr(torch, config["dtype"])]
    for name, a, b in zip(names, actual, expected):
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)}, torch.nn's {tuple(b.shape)}")
        elif (err := rel_err(a, b)) > (bound := (bounds or {}).get(name, tolerance)) or not math.isfinite(err):
            problems.append(f"{name}: relative error {err:.2e} above {bound:.1e}")
    return problems


# --- several programs at once (CPU) ---------------------------------------------------------------------------

# The kernels each concurrent configuration ran on several programs, counted over the sweep.
SPLIT_KERNELS: collections.Counter[str] = collections.Counter()


def run_concurrent(config: dict) -> list[str]:
    """The problems of one configuration on several programs a layer at once against the same programs launched one
    step at a time (empty: it passed).

    Both runs split each layer into the same tiles, so they do the same arithmetic: numpy's float32 matmul under the
    interpreter need not round a [16, 64] @ [64, 16] tile as the same columns of a [64, 64] product (OpenBLAS on an
    AVX-512 CPU does not), so a one-program run is no bitwise reference for a split grid."""
    from concurrent_interpreter import programs_at_once  # the interpreter's internals: CPU only

    fields = dict(block_h=config.get("block_h", 16))
    if config.get("k_split", 1) > 1:
        fields["k_split"] = config["k_split"]
    if config["batch_groups"] > 1:
        fields["batch_groups"] = config["batch_groups"]
    if config.get("held_rows"):
        fields.update(block_k=config["held_rows"], block_ks=16)
    if config.get("block_b", 16) != 16:
        fields["block_b"] = config["block_b"]
    saved_limit = _plan.MAX_BARRIER_ARRIVALS
    with switches(config) as problems:
        ours, _ = build(config)
        try:
            # Step by step, the launch boundary is the barrier: programs run one after another, race-free.
            _plan.force_plan(**fields, persistent=False)
            stepwise, names = step(config, ours)
            if config["max_arrivals"]:
                _plan.MAX_BARRIER_ARRIVALS = config["max_arrivals"]
            with programs_at_once(config["sched_seed"], config["switch_probability"],
                                  weak_stores=config["weak_stores"]) as launches:  # fmt: skip
                _plan.force_plan(**fields, persistent=True)
                several, _ = step(config, ours)
        finally:
            _plan.force_plan()
            _plan.MAX_BARRIER_ARRIVALS = saved_limit
    split = {launch.kernel for launch in launches if launch.SYNC and launch.programs > 1}
    SPLIT_KERNELS.update(split)
    if not split:
        problems.append(f"no persistent launch of several programs: {launches}")
    for name, a, b in zip(names, stepwise, several):
        if torch.isnan(a).any() or torch.isnan(b).any():
            problems.append(f"{name}: NaN")
        elif not torch.equal(a, b):
            problems.append(f"{name}: differs from the step-by-step run's by {rel_err(b, a):.2e}")
    return problems


# --- the sweep ------------------------------------------------------------------------------------------------


class _InDtype(nn.Module):
    """A torch.nn layer run in another dtype on step's float64 values, its results back in float64."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.layer, self.dtype = copy.deepcopy(layer).to(dtype), dtype

    def named_parameters(self, *args, **kwargs):  # the names step maps: the layer's own
        return self.layer.named_parameters(*args, **kwargs)

    def forward(self, y, hx):
        def cast(value, dtype):
            if isinstance(value, tuple) and not isinstance(value, PackedSequence):
                return tuple(cast(v, dtype) for v in value)
            return value.to(dtype) if value is not None else None

        out, state = self.layer(cast(y, self.dtype), cast(hx, self.dtype))
        return cast(out, torch.float64), cast(state, torch.float64)


def torch_errors(config: dict) -> dict[str, float]:
    """torch.nn's own relative errors in the config's dtype against float64, by result name: how well the problem
    is conditioned (outside dropout in training, whose reference is ours)."""
    ours, torch_layers = build(config)
    expected, names = step(config, ours, torch_layers)
    dtype = getattr(torch, config["dtype"])
    theirs, _ = step(config, ours, [(_InDtype(layer, dtype), n) for layer, n in torch_layers])
    return {name: rel_err(a, b) for name, a, b in zip(names, theirs, expected)}


def bounds_from_torch(config: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(the relative error allowed per result, torch.nn's own error per result) in the config's dtype: the tolerance,
    or TORCH_FACTOR times torch.nn's error on the same inputs where that is more (the GPU tier's rule against cuDNN)."""
    theirs = torch_errors(config)
    tolerance = TOLERANCE[getattr(torch, config["dtype"])]
    return {name: max(tolerance, TORCH_FACTOR * err) for name, err in theirs.items()}, theirs


def check(config: dict) -> tuple[str, list[str]]:
    """("pass" | "precision only" | "fail", problems) of one configuration. Beyond the dtype's tolerance, a result
    within TORCH_FACTOR of torch.nn's own error in that dtype passes (a tensor of a few values with cancellation, a
    relu's kink: ill-conditioned for torch.nn as well); a failure says what torch.nn reaches."""
    if "sched_seed" in config:
        problems = run_concurrent(config)
        return ("fail" if problems else "pass"), problems
    against_torch = not (config["training"] and config["dropout"])  # with dropout in training: the reference's masks
    problems = run_config(config)
    if problems and against_torch:
        bounds, theirs = bounds_from_torch(config)
        problems = [f"{p} (torch.nn in {config['dtype']}: {theirs[p.split(':')[0]]:.2e})"
                    if p.split(":")[0] in theirs else p for p in run_config(config, bounds)]  # fmt: skip
    if problems and config["dtype"] != MOST_PRECISE:
        precise = dict(config, dtype=MOST_PRECISE)
        if not run_config(precise, bounds_from_torch(precise)[0] if against_torch else None):
            return "precision only", problems
    return ("fail" if problems else "pass"), problems


def lost_context(error: Exception) -> bool:
    """Whether error is a CUDA error that leaves the context unusable (an illegal address: every later call fails)."""
    return isinstance(error, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--count", type=int, default=0, help="stop after this many configurations (0: no limit)")
    parser.add_argument("--concurrent", action="store_true", help="several programs a layer (CPU only)")
    parser.add_argument("--replay", help="one configuration, as printed on a failure")
    args = parser.parse_args(argv)
    _plan.empty_buffer = lambda *shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    # IEEE float32 on both sides, as tests/conftest.py sets it (cuDNN's TF32 flag is on by default: torch.nn's float32
    # error, by which a failure is judged, would be TF32's).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.concurrent and DEVICE.type != "cpu":
        parser.error("--concurrent runs the interpreter's threads: CPU only")
    if args.replay:
        verdict, problems = check(json.loads(args.replay))
        print(verdict, *problems, sep="\n  ")
        return 0 if verdict == "pass" else 1
    rng = random.Random(args.seed)
    end = time.monotonic() + 60 * args.minutes
    tally: dict[str, int] = {}
    while time.monotonic() < end and (not args.count or sum(tally.values()) < args.count):
        config = draw(rng, args.concurrent)
        if DEVICE.type == "cuda":  # before it runs: a configuration that hangs is killed from outside, unreported
            print(f"checking: {json.dumps(config)}", flush=True)
        try:
            verdict, problems = check(config)
        except Exception as error:  # a crash is a finding too: report it with the config and go on
            verdict, problems = "fail", [f"raised {type(error).__name__}: {error}"]
            if DEVICE.type == "cuda" and lost_context(error):
                print(f"{verdict}: {json.dumps(config)}", *problems[:8], "stopping: the CUDA context is lost",
                      sep="\n  ", flush=True)  # fmt: skip
                return 1
        tally[verdict] = tally.get(verdict, 0) + 1
        if verdict != "pass":
            print(f"{verdict}: {json.dumps(config)}", *problems[:8], sep="\n  ", flush=True)
    print(f"seed {args.seed}: {sum(tally.values())} configurations, {tally} ({DEVICE})", flush=True)
    if SPLIT_KERNELS:
        print(f"kernels run on several programs (configurations): {dict(SPLIT_KERNELS)}")
    return 0 if set(tally) <= {"pass"} else 1


if __name__ == "__main__":
    sys.exit(main())
