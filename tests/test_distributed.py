"""Data-parallel training (DDP, and FSDP2's fully_shard) with the modules, against torch.nn's, on the CPU.

Two processes on the gloo backend, each its own batch: gradients are averaged across them by the wrappers' hooks on
the parameters, so the modules have to expose plain parameters whose gradients autograd accumulates, as torch.nn's
do. The processes run the kernels under the interpreter when the suite does (TRITON_INTERPRET is inherited).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import tritonrnn

WORLD = 2


def _models():
    """(name, ours, torch.nn's with the same weights)."""
    torch.manual_seed(0)
    pairs = []
    for name, ours_cls, torch_cls, kwargs in (
        ("lstm", tritonrnn.LSTM, torch.nn.LSTM, dict(num_layers=2, bidirectional=True)),
        ("gru", tritonrnn.GRU, torch.nn.GRU, dict(batch_first=True)),
    ):
        theirs = torch_cls(5, 7, **kwargs)
        ours = ours_cls(5, 7, **kwargs)
        ours.load_state_dict(theirs.state_dict())
        pairs.append((name, ours, theirs))
    return pairs


def _train(model, rank: int, wrap) -> dict[str, torch.Tensor]:
    wrapped = wrap(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    for step in range(2):
        x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(10 * rank + step))  # each rank its own batch
        out, state = wrapped(x)
        h = state[0] if isinstance(state, tuple) else state
        loss = (out * out.detach().cos()).sum() + h.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        results = {}
        for wrapper, wrap in (
            ("ddp", DistributedDataParallel),
            ("fsdp", lambda m: fully_shard(m, mesh=mesh)),
        ):
            for name, ours, theirs in _models():
                results[wrapper, name] = (_train(ours, rank, wrap), _train(theirs, rank, wrap))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")  # FSDP2 warns that the output is a view (the modules' is)
def test_ddp_and_fsdp2_train_like_torch_nn(tmp_path):
    """Two SGD steps on two ranks: each rank's parameters match torch.nn's under the same wrapper, and the ranks
    hold the same parameters (the gradients were averaged across them, not kept per rank)."""
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert set(ranks[0]) == {(w, n) for w in ("ddp", "fsdp") for n in ("lstm", "gru")}
    for key, (ours, theirs) in ranks[0].items():
        assert list(ours) == list(theirs), key
        for name in ours:
            # float32 weights after two steps on the kernels and on torch.nn's CPU op, each summing in its own order
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
            assert torch.equal(ours[name], ranks[1][key][0][name]), (key, name)  # the ranks agree
        initial = {name: theirs.state_dict() for name, _, theirs in _models()}  # the untrained weights
        assert all(not torch.equal(ours[n], p) for n, p in initial[key[1]].items()), key  # every tensor trained
