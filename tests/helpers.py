"""Helpers shared by the test files: models with copied weights, losses, error measures."""

from __future__ import annotations

import torch
from torch import nn

import tritonrnn
from tritonrnn import reference

# Relative error (Frobenius norm) allowed against a float64 reference, per dtype, for outputs,
# final states and gradients alike. The norm-relative error does not grow with the reduction length
# the way element-wise errors of weight gradients do, so one figure covers every tensor. Values: a few
# times what the kernels reach at the test sizes (fp32 ~4e-7, fp16 ~5e-4, bf16 ~1e-2 at T <= 63).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def make_pair(cell: str, input_size: int, hidden: int, **kwargs) -> tuple[nn.Module, nn.Module]:
    """A tritonrnn module and the torch.nn module of the same class holding the same weights (float64)."""
    if cell.startswith("rnn"):
        kwargs["nonlinearity"] = cell.split("_")[1]
    name = {"lstm": "LSTM", "gru": "GRU"}.get(cell, "RNN")
    ours = getattr(tritonrnn, name)(input_size, hidden, **kwargs).double()
    theirs = getattr(nn, name)(input_size, hidden, **kwargs).double()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


class CountCalls(nn.Module):
    """An identity parametrization counting how often the weight it parametrizes is computed."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, w):
        self.calls += 1
        return w


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; a NaN or inf on either side gives inf (never NaN, which every
    comparison and max() would pass over)."""
    actual, expected = actual.double(), expected.double()
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def run(module: nn.Module, x: torch.Tensor, hx, weights: dict[str, torch.Tensor]):
    """Forward, then gradients of a loss that uses the output and the final states.

    Returns (output, final states as a flat list, dict of gradients by name: input, hx, parameters).
    """
    x = x.detach().clone().requires_grad_()
    if hx is not None:
        hx = (
            tuple(h.detach().clone().requires_grad_() for h in hx)
            if isinstance(hx, tuple)
            else hx.detach().clone().requires_grad_()
        )
    out, states = module(x, hx)
    states = list(states) if isinstance(states, tuple) else [states]
    loss = (out.double() * weights["out"].to(out.device)).sum()
    for k, s in enumerate(states):
        loss = loss + (s.double() * weights[f"state{k}"].to(s.device)).sum()
    inputs = {"input": x}
    if hx is not None:
        for k, h in enumerate(hx if isinstance(hx, tuple) else (hx,)):
            inputs[f"hx{k}"] = h
    inputs.update(dict(module.named_parameters()))
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return out.detach(), [s.detach() for s in states], dict(zip(inputs, grads))


def loss_weights(out_shape, state_shapes, generator=None) -> dict[str, torch.Tensor]:
    """Random cotangents for ``run`` (float64, CPU)."""
    weights = {"out": torch.randn(out_shape, dtype=torch.float64, generator=generator)}
    for k, shape in enumerate(state_shapes):
        weights[f"state{k}"] = torch.randn(shape, dtype=torch.float64, generator=generator)
    return weights


def composed_reference(model, x, states, masks=None, w_hh=None):
    """The stack written out by hand from one-direction reference layers (time-major x).

    masks[l]: the multiplier applied to layer l's output for layer l + 1 (None: no dropout);
    w_hh[l][d]: the recurrent weight to use instead of the parameter (weight drop).
    Returns (every layer's output, every layer's final states as in StackedRNN).
    """
    outputs, finals = [], []
    for index, layer in enumerate(model.layers):
        state = states[index]
        h0, c0 = state if layer.cell == "lstm" else (state, None)
        ys, hs, cs = [], [], []
        for d, suffix in enumerate(layer.suffixes):
            weights = [getattr(layer, f"{name}{suffix}") if layer.bias or "weight" in name else None
                       for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]  # fmt: skip
            if w_hh is not None:
                weights[1] = w_hh[index][d]
            y, h, c = reference.layer_forward(
                layer.cell, x, h0[d], c0[d] if c0 is not None else None, *weights, reverse=d == 1
            )
            ys.append(y)
            hs.append(h)
            cs.append(c)
        y = torch.cat(ys, dim=-1)
        if model.residual:
            y = y + x
        outputs.append(y)
        finals.append((torch.stack(hs), torch.stack(cs)) if layer.cell == "lstm" else torch.stack(hs))
        x = y * masks[index] if masks is not None and masks[index] is not None else y
    return outputs, finals


def flat(states) -> list[torch.Tensor]:
    """A stack's per-layer states ((h, c) for LSTM layers, h for the others) as one list of tensors."""
    return [t for s in states for t in (s if isinstance(s, tuple) else (s,))]


def random_hx(module: nn.RNNBase, batch: int, generator: torch.Generator | None = None):
    """A random hx for a torch.nn-style module (float64 on the CPU, uniform in [-1, 1]): h0, or (h0, c0) for an LSTM."""
    shape = (module.num_layers * (2 if module.bidirectional else 1), batch)
    h0 = 2 * torch.rand(*shape, module.proj_size or module.hidden_size, dtype=torch.float64, generator=generator) - 1
    if not isinstance(module, nn.LSTM):
        return h0
    return h0, 2 * torch.rand(*shape, module.hidden_size, dtype=torch.float64, generator=generator) - 1


def states_to(hx, *args):
    """hx (a tensor or a tuple of them) moved or cast by ``Tensor.to(*args)``."""
    return tuple(h.to(*args) for h in hx) if isinstance(hx, tuple) else hx.to(*args)
