"""The autotuner's choices, pruning and cache, with the GPU-facing steps (compile, time) replaced by fakes.

On the device the real steps run through functional.kernel_plan; here the logic around them is checked:
no candidate that could deadlock is ever timed, the sequence length is not a key, the cache survives
concurrent writers and corrupt files, and the switches (TRITONRNN_AUTOTUNE, CUDA graph capture) hold.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing

import pytest
import torch

from tritonrnn import _plan, autotune

GPU = "NVIDIA H100 80GB HBM3"
CUDA0 = torch.device("cuda", 0)
CONFIG = {"block_h": 32, "block_b": 16, "num_warps": 8, "num_stages": 3}
ENTRY = {"forward": CONFIG, "backward": CONFIG}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONRNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITONRNN_AUTOTUNE", "1")
    return tmp_path


def test_the_cache_folder_is_named_by_the_variable_then_xdg_then_home(tmp_path, monkeypatch):
    """README: TRITONRNN_CACHE_DIR, by default $XDG_CACHE_HOME/tritonrnn or ~/.cache/tritonrnn."""
    monkeypatch.setenv("TRITONRNN_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TRITONRNN_CACHE_DIR")
    assert autotune.cache_dir() == tmp_path / "xdg" / "tritonrnn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_dir() == tmp_path / "home" / ".cache" / "tritonrnn"
    monkeypatch.setenv("TRITONRNN_CACHE_DIR", " ~/tuned ")  # as a shell would expand it, not a folder named "~"
    assert autotune.cache_dir() == tmp_path / "home" / "tuned"


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda answers as a 132-SM H100 that is not capturing a graph."""
    props = type("Props", (), {"multi_processor_count": 132})()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: GPU)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_plan, "_sm_count", lambda index: 132)


class FakeTuner:
    """Times candidates by a formula; records what it was asked to time."""

    def __init__(self, too_big_block_h: int = 64):
        self.timed: list[_plan.LayerPlan] = []
        self.backward_under: list[_plan.LayerPlan] = []  # the forward plan each backward timing ran under
        self.too_big_block_h = too_big_block_h

    def tuner(self) -> autotune.Tuner:
        def misfit(plan):
            return "needs too much shared memory" if plan.block_h >= self.too_big_block_h else None

        def time_forward(plan):
            self.timed.append(plan)
            return 1.0 / plan.block_h + 0.01 * plan.num_warps + 0.001 * plan.block_b

        def time_backward(fwd, bwd):
            self.timed.append(bwd)
            self.backward_under.append(fwd)
            return 1.0 + 0.01 * bwd.num_warps - 0.001 * bwd.block_b

        return autotune.Tuner(misfit, time_forward, time_backward)


def test_candidates_respect_residency_and_problem_size():
    configs = autotune.candidates(hidden=2048, batch=16, directions=2, sm_count=132)
    # 2048 / 16 = 128 programs per direction: two directions cannot both be resident, so only wider slices remain.
    assert configs and all(-(-2048 // c.block_h) * 2 <= 132 for c in configs)
    assert {c.block_h for c in configs} == {32, 64}
    assert all(c.block_b == 16 for c in configs)  # B=16: one batch tile
    # Both stage counts even for one tile: the pipeliner still buffers its loads (perf/NOTES.md, twenty-third session).
    assert {c.num_stages for c in configs} == {1, 3}
    small = autotune.candidates(hidden=20, batch=5, directions=1, sm_count=132)
    assert {c.block_h for c in small} == {16, 32} and {c.block_b for c in small} == {16}


def test_tuner_never_times_a_misfit_and_picks_the_fastest(fake_gpu):
    fake = FakeTuner(too_big_block_h=64)
    configs = autotune.candidates(hidden=512, batch=64, directions=1, sm_count=132)
    key = autotune.TuneKey("lstm", 512, 64, "bf16")
    entry = fake.tuner().tune(configs, key, CUDA0)
    assert all(plan.block_h < 64 and plan.persistent for plan in fake.timed)
    assert entry["forward"] == {"block_h": 32, "block_b": 16, "num_warps": 4, "num_stages": 1, "k_split": 1}
    # Every backward candidate was timed under the chosen forward plan, held fixed.
    assert fake.backward_under and all(
        dataclasses.asdict(autotune.KernelConfig(p.block_h, p.block_b, p.num_warps, p.num_stages, p.k_split))
        == entry["forward"]
        for p in fake.backward_under
    )
    assert entry["backward"]["block_b"] == 64 and entry["backward"]["num_warps"] == 4
    plan = autotune.plan_from_entry(entry, key, CUDA0)
    assert plan.num_programs == 16 and plan.for_backward().block_b == 64


def test_candidates_cut_the_reduction_in_a_chunk_a_warp_where_it_compiles(fake_gpu, monkeypatch):
    """Each 16- and 32-row configuration also with its reduction in one chunk a warp (32 rows: where the batch has
    them); the tuner drops the plans whose held rows make chunks under 16 (a wide slice holding part of its rows);
    with a projection the smaller of its two reductions decides; entries stored before k_split existed are read as
    one chunk."""
    configs = autotune.candidates(hidden=512, batch=16, directions=1, sm_count=132)
    split = [c for c in configs if c.k_split > 1]
    assert split and all(c.k_split == c.num_warps and c.block_b == 16 for c in split)
    large = [c for c in autotune.candidates(hidden=512, batch=256, directions=1, sm_count=132) if c.k_split > 1]
    assert {c.block_b for c in large} == {16, 32} and all(c.k_split == c.num_warps for c in large)
    projected = autotune.candidates(hidden=512, batch=16, directions=1, sm_count=132, proj=64)
    assert {c.k_split for c in projected} == {1, 4}  # 64 projected units: 4 chunks of 16, not 8 of 8
    assert {c.k_split for c in autotune.candidates(512, 16, 1, 132, proj=128)} == {c.k_split for c in configs}
    assert {c.k_split for c in autotune.candidates(hidden=64, batch=16, directions=1, sm_count=132)} == {1, 4}
    assert {c.k_split for c in autotune.candidates(hidden=32, batch=16, directions=1, sm_count=132)} == {1}
    fake = FakeTuner(too_big_block_h=128)
    monkeypatch.setattr(_plan, "HELD_WEIGHT_BYTES", 32 * 1024)  # 64 held rows at 64 units: chunks of 8 with 8 warps
    configs = autotune.candidates(hidden=2048, batch=16, directions=1, sm_count=132)
    fake.tuner().tune(configs, autotune.TuneKey("lstm", 2048, 16, "bf16"), CUDA0)
    assert any(p.k_split == 8 for p in fake.timed) and all(p.block_k // p.k_split >= 16 for p in fake.timed)
    assert any(p.block_h == 64 and p.k_split == 4 for p in fake.timed)
    assert not any(p.block_h == 64 and p.k_split == 8 for p in fake.timed)
    old_entry = {"forward": dict(CONFIG), "backward": dict(CONFIG)}
    old_entry["forward"].pop("k_split", None)
    assert autotune.entry_problem(old_entry) is None
    key = autotune.TuneKey("lstm", 512, 16, "bf16")
    assert autotune.plan_from_entry(old_entry, key, CUDA0).k_split == 1
    assert "k_split: 3" in autotune.entry_problem({"forward": dict(CONFIG, k_split=3), "backward": CONFIG})


def test_projection_candidates_run_the_whole_batch_in_one_group(fake_gpu):
    """The projection's kernels take no batch groups (LayerRun refuses them): its candidates are timed, and its tuned
    plans built, with one group, where the same key without projection splits B<=64 on a 132-SM GPU."""
    fake = FakeTuner(too_big_block_h=64)
    configs = autotune.candidates(hidden=512, batch=64, directions=1, sm_count=132)
    fake.tuner().tune(configs, autotune.TuneKey("lstm", 512, 64, "bf16"), CUDA0)
    assert any(plan.batch_groups > 1 for plan in fake.timed)  # the check below could fail
    fake.timed.clear()
    key = autotune.TuneKey("lstm", 512, 64, "bf16", proj=128)
    entry = fake.tuner().tune(configs, key, CUDA0)
    assert fake.timed and all(plan.batch_groups == 1 for plan in fake.timed)
    assert autotune.plan_from_entry(entry, key, CUDA0).batch_groups == 1


def test_float32_on_the_fma_units_takes_its_reduction_whole_only_over_16_rows_and_8_warps(cache, fake_gpu):
    """LSTM and GRU on the FMA units (float32 without TF32) in one chunk: 16-row tiles and 8 warps only (more rows or
    fewer warps spill kilobytes a thread, and Triton 3.9's LLVM aborts the process compiling such an LSTM: no fit
    check could catch it); in chunks, with TF32, in 16-bit or with one gate, every candidate as before."""
    plain = autotune.candidates(512, 64, 1, 132)
    fma = autotune.candidates(512, 64, 1, 132, gates=4, fma=True)
    whole = [c for c in fma if c.k_split == 1]
    assert whole and all(c.block_b == 16 and c.num_warps == 8 for c in whole)
    assert [c for c in fma if c.k_split > 1] == [c for c in plain if c.k_split > 1]
    assert any(c.k_split == 1 and (c.block_b > 16 or c.num_warps == 4) for c in plain)  # the check above could fail
    assert autotune.candidates(512, 64, 1, 132, gates=1, fma=True) == plain
    assert autotune.candidates(512, 64, 1, 132, gates=3, fma=False) == plain
    # The key says which: float32 without TF32 is pruned, with TF32 not.
    for tf32, pruned in ((False, True), (True, False)):
        fake = FakeTuner(too_big_block_h=128)
        assert autotune.tuned_plan(autotune.TuneKey("gru", 512, 64, "fp32", tf32=tf32), CUDA0, fake.tuner) is not None
        wide = [p for p in fake.timed if p.k_split == 1 and (p.block_b > 16 or p.num_warps == 4)]
        assert fake.timed and (not wide) == pruned, (tf32, wide[:2])


def test_a_candidate_that_fails_to_run_is_left_out_logged_and_none_running_means_heuristics(
    cache, fake_gpu, caplog
):  # fmt: skip
    """A candidate whose timing raises (a launch refused, out of memory) is not chosen and does not end the tuning or
    the caller's call; where none runs, the heuristics serve, said once."""
    fake = FakeTuner(too_big_block_h=128)
    tuner = fake.tuner()
    time_forward = tuner.time_forward

    def failing_wide(plan):
        if plan.block_h == 64:
            raise RuntimeError("CUDA error: too many resources requested for launch")
        return time_forward(plan)

    key = autotune.TuneKey("lstm", 512, 64, "bf16")
    with caplog.at_level(logging.INFO, logger="tritonrnn"):
        entry = dataclasses.replace(tuner, time_forward=failing_wide).tune(autotune.candidates(512, 64, 1, 132), key,
                                                                          CUDA0)  # fmt: skip
    assert entry["forward"]["block_h"] == 32  # 64 would be the fastest by the formula: it failed
    assert "candidates failed to run, left out" in caplog.text and "too many resources" in caplog.text

    def failing(plan):
        raise torch.OutOfMemoryError("CUDA out of memory")

    broken = dataclasses.replace(fake.tuner(), time_forward=failing)
    with caplog.at_level(logging.INFO, logger="tritonrnn"):
        assert autotune.tuned_plan(autotune.TuneKey("gru", 256, 16, "bf16"), CUDA0, lambda: broken) is None
    assert "no candidate configuration ran on this GPU" in caplog.text and "using heuristics" in caplog.text


def test_nothing_fits_means_heuristics(cache, fake_gpu):
    fake = FakeTuner(too_big_block_h=16)
    key = autotune.TuneKey("lstm", 512, 16, "bf16")
    assert autotune.tuned_plan(key, CUDA0, fake.tuner) is None
    assert fake.timed == []


def test_tuned_once_then_cached_and_sequence_length_is_no_key(cache, fake_gpu):
    fake = FakeTuner()
    calls = []

    def factory():
        calls.append(1)
        return fake.tuner()

    key = autotune.TuneKey("gru", 256, autotune.batch_bucket(17), "bf16")
    first = autotune.tuned_plan(key, CUDA0, factory)
    second = autotune.tuned_plan(autotune.TuneKey("gru", 256, autotune.batch_bucket(30), "bf16"), CUDA0, factory)
    assert first == second and len(calls) == 1
    files = list(cache.glob("autotune-nvidia-h100-80gb-hbm3-triton-*.json"))
    assert len(files) == 1 and key.text() in json.loads(files[0].read_text())["configs"]
    assert "T=" not in key.text()


def test_threads_on_one_gpu_tune_one_at_a_time_and_a_key_once(cache, fake_gpu):
    """Serving threads on one GPU: two tunings at once would time each other's kernels. Three threads, two of them on
    one key: that key is tuned once (the other waits for its plan), and no two tunings overlap."""
    import threading
    import time

    fake, tuned, running, overlapped = FakeTuner(), [], [], []

    def factory(key):
        def tuner():
            running.append(key)
            overlapped.append(len(running) > 1)
            tuned.append(key)
            time.sleep(0.2)  # every thread is past the memo's first check by now
            running.remove(key)
            return fake.tuner()

        return tuner

    keys = [autotune.TuneKey("lstm", 256, 16, "bf16")] * 2 + [autotune.TuneKey("gru", 256, 16, "bf16")]
    start, plans = threading.Barrier(len(keys)), {}

    def ask(index, key):
        start.wait()
        plans[index] = autotune.tuned_plan(key, CUDA0, factory(key))

    threads = [threading.Thread(target=ask, args=item) for item in enumerate(keys)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(key.cell for key in tuned) == ["gru", "lstm"] and not any(overlapped)
    assert len(plans) == 3 and plans[0] == plans[1] is not None and plans[2] is not None


def test_a_tuned_plan_is_made_again_after_a_refused_cooperative_launch(cache, fake_gpu, monkeypatch):
    """A plan keeps the resident programs of its making (persistent, directions together). After the driver refuses
    a cooperative launch (MPS), the tuned entry is planned again below the refused size, as the heuristics are."""
    monkeypatch.setattr(_plan, "_resident_cap", {})
    key = autotune.TuneKey("gru", 1024, 16, "bf16", directions=2)
    entry = {"forward": dict(CONFIG, block_h=16), "backward": dict(CONFIG, block_h=16)}
    autotune.ConfigStore.for_gpu(GPU).put({key.text(): entry})
    before = autotune.tuned_plan(key, CUDA0, FakeTuner().tuner)
    assert before.num_programs == 64 and before.persistent and before.directions_together  # 128 of 132 SMs
    refusal = RuntimeError(f"Triton Error [CUDA]: {_plan.COOPERATIVE_TOO_LARGE}")
    assert _plan.cooperative_refused(refusal, 128, CUDA0)
    after = autotune.tuned_plan(key, CUDA0, FakeTuner().tuner)
    assert after.persistent and not after.directions_together  # a grid of 64 a direction


def test_a_layer_plans_the_tuned_entry_of_its_key(cache, fake_gpu, monkeypatch):
    """layer_op.kernel_plan on a GPU with tuning on: the plan a layer launches is its key's tuned entry (the forward's
    and the backward's configuration), not the heuristics'; no tuning where the entry is cached. The compile check is
    stubbed (the GPU tier runs it: test_gpu.test_autotuner_tunes_caches_and_runs)."""
    from tritonrnn import layer_op, layer_run

    monkeypatch.setattr(layer_op, "_gpu_misfit", lambda *args: None)
    monkeypatch.setattr(layer_op, "_gpu_tuner", lambda *args: pytest.fail("a cached key must not be tuned"))
    key = autotune.TuneKey("gru", 512, autotune.batch_bucket(16), "bf16")
    forward = {"block_h": 16, "block_b": 16, "num_warps": 4, "num_stages": 1, "k_split": 4}
    backward = {"block_h": 16, "block_b": 16, "num_warps": 8, "num_stages": 3, "k_split": 1}
    autotune.ConfigStore.for_gpu(GPU).put({key.text(): {"forward": forward, "backward": backward}})
    heuristic = _plan.plan_layer("gru", 512, 16, torch.bfloat16, CUDA0, 1)
    plan = layer_op.kernel_plan("gru", 512, 16, torch.bfloat16, CUDA0, layer_run.Variant())
    for config, got in ((forward, plan), (backward, plan.for_backward())):
        assert {name: getattr(got, name) for name in config} == config
    assert {name: getattr(heuristic, name) for name in forward} != forward, "the entry must not be the heuristics'"


def test_shipped_defaults_come_before_tuning_and_after_the_users_cache(cache, fake_gpu, monkeypatch, tmp_path):
    """The package's tuned/<gpu slug>.json, read by the real loader from a stand-in package folder: used without
    tuning where the user's cache has no entry; the user's cache entry where it has one."""
    package = tmp_path / "package"
    monkeypatch.setattr(autotune, "__file__", str(package / "autotune.py"))
    (package / "tuned").mkdir(parents=True)
    key = autotune.TuneKey("lstm", 512, 16, "bf16")
    shipped = {"forward": {"block_h": 32, "block_b": 16, "num_warps": 8, "num_stages": 3}}
    shipped["backward"] = shipped["forward"]
    autotune.ConfigStore(package / "tuned" / f"{autotune.slug(GPU)}.json").put({key.text(): shipped})
    assert autotune.shipped_defaults(GPU) == {key.text(): shipped} and autotune.shipped_defaults("Another GPU") == {}
    plan = autotune.tuned_plan(key, CUDA0, lambda: pytest.fail("must not tune"))
    assert plan.block_h == 32 and plan.num_warps == 8 and plan.backward is None

    autotune._memo.clear()  # a new process: the user's cache read again
    users = {"forward": dict(shipped["forward"], num_warps=4), "backward": dict(shipped["forward"], num_warps=4)}
    autotune.ConfigStore.for_gpu(GPU).put({key.text(): users})
    plan = autotune.tuned_plan(key, CUDA0, lambda: pytest.fail("must not tune"))
    assert plan.block_h == 32 and plan.num_warps == 4


def test_switched_off_and_graph_capture_use_heuristics(cache, fake_gpu, monkeypatch):
    key = autotune.TuneKey("lstm", 512, 16, "bf16")
    for value in ("0", None):  # off, and off by default
        if value is None:
            monkeypatch.delenv("TRITONRNN_AUTOTUNE")
        else:
            monkeypatch.setenv("TRITONRNN_AUTOTUNE", value)
        assert autotune.tuned_plan(key, CUDA0, lambda: pytest.fail("must not tune")) is None
    monkeypatch.setenv("TRITONRNN_AUTOTUNE", "1")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert autotune.tuned_plan(key, CUDA0, lambda: pytest.fail("must not tune during capture")) is None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert autotune.tuned_plan(key, CUDA0, FakeTuner().tuner) is not None  # tuned once the capture is over


def test_corrupt_cache_is_ignored_with_a_warning_and_rebuilt(cache, caplog):
    store = autotune.ConfigStore.for_gpu(GPU)
    store.path.write_text('{"format": 1, "configs": {"a": ')
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        assert store.load() == {}
    assert "corrupt autotune cache" in caplog.text
    store.put({"k": ENTRY})
    assert json.loads(store.path.read_text()) == {"format": 1, "configs": {"k": ENTRY}}
    store.path.write_text('["not", "a", "cache"]')
    assert store.load() == {}
    store.path.write_bytes(b"\xff\xfe not text")
    assert store.load() == {}
    store.path.write_text("[" * 100_000)  # json's parser recurses: a RecursionError, not a ValueError
    assert store.load() == {}


@pytest.mark.parametrize(
    "entry, problem",
    [
        pytest.param([1, 2], "expected an object, got list", id="list"),
        pytest.param({"forward": CONFIG}, "backward: expected the fields", id="no-backward"),
        pytest.param({**ENTRY, "forward": {**CONFIG, "foo": 1}}, "forward: expected the fields", id="unknown-field"),
        pytest.param({**ENTRY, "forward": {**CONFIG, "block_h": "32"}}, "forward.block_h: '32' is not", id="text"),
        pytest.param({**ENTRY, "forward": {**CONFIG, "block_h": 0}}, "forward.block_h: 0 is not", id="zero"),
        pytest.param({**ENTRY, "backward": {**CONFIG, "block_h": -16}}, "backward.block_h: -16", id="negative"),
        pytest.param({**ENTRY, "forward": {**CONFIG, "block_h": 32.0}}, "forward.block_h: 32.0", id="float"),
        pytest.param({**ENTRY, "forward": {**CONFIG, "num_warps": 3}}, "forward.num_warps: 3 is not", id="warps"),
    ],
)
def test_a_bad_cache_entry_is_tuned_again_with_a_warning(cache, fake_gpu, entry, problem, caplog):
    """A hand-edited or foreign entry must not reach the plan (a -16 slice gave a negative grid): the entry is
    dropped with a warning naming it, the key is tuned again, and the good entries stay."""
    key = autotune.TuneKey("lstm", 512, 16, "bf16")
    store = autotune.ConfigStore.for_gpu(GPU)
    store.path.write_text(json.dumps({"format": 1, "configs": {key.text(): entry, "other": ENTRY}}))
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        plan = autotune.tuned_plan(key, CUDA0, FakeTuner().tuner)
    assert plan is not None and plan.block_h in autotune.BLOCK_H and plan.num_programs > 0
    assert f"ignoring the autotune entry {key.text()}" in caplog.text and problem in caplog.text
    configs = json.loads(store.path.read_text())["configs"]
    assert configs["other"] == ENTRY and autotune.entry_problem(configs[key.text()]) is None


def test_an_unwritable_cache_warns_and_the_tuning_still_serves(tmp_path, fake_gpu, monkeypatch, caplog):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("TRITONRNN_CACHE_DIR", str(not_a_folder / "sub"))
    monkeypatch.setenv("TRITONRNN_AUTOTUNE", "1")
    calls = []

    def factory():
        calls.append(1)
        return FakeTuner().tuner()

    key = autotune.TuneKey("rnn_tanh", 128, 16, "bf16")
    with caplog.at_level(logging.INFO, logger="tritonrnn"):
        first = autotune.tuned_plan(key, CUDA0, factory)
        assert autotune.tuned_plan(key, CUDA0, factory) == first and len(calls) == 1
    assert first is not None and "cannot write the autotune cache" in caplog.text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_cache_file_is_readable_as_the_umask_allows(cache, umask, mode):
    store = autotune.ConfigStore.for_gpu(GPU)
    old = autotune.os.umask(umask)
    try:
        store.put({"k": ENTRY})
        store.put({"k2": ENTRY})  # replacing the file keeps the mode
    finally:
        autotune.os.umask(old)
    assert store.path.stat().st_mode & 0o777 == mode
    assert set(store.load()) == {"k", "k2"} and [p.name for p in store.path.parent.iterdir() if ".tmp" in p.name] == []


@pytest.mark.parametrize("value, expected", [("1", True), (" 1 ", True), ("0", False), ("", False), ("yes", None),
                                             ("2", None)])  # fmt: skip
def test_autotune_switch_values(monkeypatch, value, expected):
    monkeypatch.setenv("TRITONRNN_AUTOTUNE", value)
    if expected is None:
        with pytest.raises(ValueError, match=f"TRITONRNN_AUTOTUNE should be 0 or 1, got {value!r}"):
            autotune.enabled()
    else:
        assert autotune.enabled() is expected


def test_tf32_is_part_of_the_key_for_fp32_only():
    assert autotune.TuneKey("lstm", 512, 16, "fp32", tf32=True).text().endswith("|tf32")
    assert (
        autotune.TuneKey("lstm", 512, 16, "fp32").text() != autotune.TuneKey("lstm", 512, 16, "fp32", tf32=True).text()
    )


def _write_keys(path: str, worker: int) -> None:
    store = autotune.ConfigStore(autotune.pathlib.Path(path))
    for k in range(20):
        store.put({f"w{worker}-{k}": ENTRY})


def test_a_write_cut_short_leaves_the_old_file_whole(tmp_path, monkeypatch, caplog):
    """The file is replaced, not rewritten in place: while a write is under way a reader gets the old entries, and a
    write that fails partway (a full disk, a process killed) leaves them there, with no temporary file behind."""
    import errno

    store = autotune.ConfigStore(tmp_path / "cache.json")
    store.put({"old": ENTRY})
    seen_meanwhile = []

    def dump_then_fail(data, f, **kwargs):
        f.write(json.dumps(data, **kwargs)[:20])
        f.flush()
        seen_meanwhile.append(autotune.ConfigStore(store.path).load())
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(autotune.json, "dump", dump_then_fail)
    with caplog.at_level(logging.WARNING, logger="tritonrnn"), pytest.raises(OSError, match="No space left"):
        store.put({"new": ENTRY})
    monkeypatch.undo()
    assert seen_meanwhile == [{"old": ENTRY}] and store.load() == {"old": ENTRY}
    assert "corrupt" not in caplog.text and not list(tmp_path.glob("*.tmp"))


def test_concurrent_processes_merge_their_entries(tmp_path):
    path = tmp_path / "shared.json"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_keys, args=(str(path), w)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
        assert p.exitcode == 0
    configs = autotune.ConfigStore(path).load()
    assert len(configs) == 80
    assert not list(tmp_path.glob("*.tmp"))  # every write replaced the file atomically


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--hidden", "0"], "'0' is not an integer >= 1", id="hidden"),
        pytest.param(["--batch", "-3"], "'-3' is not an integer >= 1", id="batch"),
        pytest.param(["--export", "{tmp}"], "a folder; name the file", id="export-folder"),
        pytest.param(["--export", "{tmp}/notes.json"], "not a tritonrnn autotune export", id="export-foreign"),
    ],
)
def test_pretune_command_refuses_bad_arguments_before_tuning(argv, message, tmp_path, capsys):
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    with pytest.raises(SystemExit) as exit_:
        autotune.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}'


def test_pretune_command_runs_as_a_module_without_runpy_warning():
    """The package does not import tritonrnn.autotune, so `python -m tritonrnn.autotune` runs the only copy."""
    if torch.cuda.is_available():
        pytest.skip("the CPU answer only")
    import subprocess
    import sys

    env = {k: v for k, v in autotune.os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-W", "error::RuntimeWarning", "-m", "tritonrnn.autotune", "--cells", "lstm"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no CUDA GPU" in result.stdout, result.stderr


def test_pretune_command_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("the CPU answer only")
    assert autotune.main(["--cells", "lstm", "--hidden", "64"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out


@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("gru", 0), ("lstm", 8)])
def test_tuner_timing_functions_run_the_layer(cell, proj, monkeypatch, launched_plans):
    """The real tuner's timed calls (forward; forward and backward under a separate backward plan), here under the
    interpreter with do_bench replaced by one call, and one program so the grid cannot deadlock there: the forward
    timing launches the forward kernel on the plan timed, the backward timing the forward on the forward plan given
    and the backward kernel on the backward plan given."""
    import triton.testing

    from tritonrnn import layer_op, layer_run

    calls = []

    def one_call(fn, **kwargs):
        calls.append(fn())
        return 1.0

    monkeypatch.setattr(triton.testing, "do_bench", one_call)
    saves = []
    init = layer_run.LayerRun.__init__

    def recording(self, *args, **kwargs):
        saves.append(args[12])  # save: what backward reads is written, as in a training step
        init(self, *args, **kwargs)

    monkeypatch.setattr(layer_run.LayerRun, "__init__", recording)
    device = torch.device("cpu") if not torch.cuda.is_available() else CUDA0
    variant = layer_run.Variant(directions=2, proj=proj)
    tuner = layer_op._gpu_tuner(cell, 16, 3, torch.float32, device, variant)
    plan = _plan.plan_layer(cell, 16, 3, torch.float32, device, 2)
    kernels = "lstm_proj" if proj else "rnn"
    forward, backward = f"{kernels}_fwd_kernel", f"{kernels}_bwd_kernel"
    assert tuner.time_forward(plan) == 1.0
    assert launched_plans == [(forward, plan)]
    del launched_plans[:]
    other = dataclasses.replace(plan, num_warps=8)
    assert other != plan
    assert tuner.time_backward(plan, other) == 1.0
    assert [name for name, _ in launched_plans] == [forward, backward]
    assert dataclasses.replace(launched_plans[0][1], backward=None) == plan and launched_plans[1][1] == other
    assert len(calls) == 2 and saves == [True, True]


def test_tuning_leaves_the_users_random_numbers_alone():
    """The tuner's random problem comes from its own generator: a first call that tunes draws the same dropout masks
    (and leaves the same random numbers to the rest of the step) as a call that finds the layer tuned."""
    from tritonrnn import layer_op, layer_run

    device = torch.device("cpu") if not torch.cuda.is_available() else CUDA0
    state = torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)
    layer_op._gpu_tuner("lstm", 16, 3, torch.float32, device, layer_run.Variant(directions=1, proj=4))
    after = torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)
    assert torch.equal(after, state)


def _plan_under(monkeypatch, batch: int, proj: int, fits) -> _plan.LayerPlan | str:
    """kernel_plan's GPU branch (the heuristics, as by default) for an LSTM bf16 H=512, with the compile-and-fit
    check replaced by ``fits(stages, held_rows)``."""
    from tritonrnn import layer_op, layer_run

    monkeypatch.delenv("TRITONRNN_AUTOTUNE", raising=False)

    def misfit(cell, hidden, dtype, tf32, plan, variant, index):
        stages = max(plan.num_stages, plan.for_backward().num_stages)
        return None if fits(stages, plan.block_k) else "needs more shared memory"

    monkeypatch.setattr(layer_op, "_gpu_misfit", misfit)
    return layer_op.kernel_plan("lstm", 512, batch, torch.bfloat16, CUDA0, layer_run.Variant(proj=proj))


@pytest.mark.parametrize("proj", [0, 128], ids=["plain", "projection"])
def test_a_plan_with_one_batch_tile_takes_one_stage_then_fewer_rows(fake_gpu, monkeypatch, proj):
    """One batch tile (B=16): the heuristics take one pipeline stage from the start (more overlap nothing); where that
    does not fit, rows are halved (with a projection, W_hh's rows of both kernels' reductions), down to 64 held."""
    heuristic = _plan.plan_layer("lstm", 512, 16, torch.bfloat16, CUDA0, 1)
    assert heuristic.num_stages == 1 and heuristic.block_k == 512 and heuristic.block_b >= 16
    plan = _plan_under(monkeypatch, 16, proj, lambda stages, rows: stages == 1)
    assert plan.num_stages == 1 and plan.block_k == 512
    plan = _plan_under(monkeypatch, 16, proj, lambda stages, rows: stages == 1 and rows <= 256)
    assert plan.num_stages == 1 and plan.block_k == 256
    plan = _plan_under(monkeypatch, 16, proj, lambda stages, rows: stages == 1 and rows < 64)
    assert isinstance(plan, str) and "shared memory" in plan


def test_the_heuristics_choose_width_warps_and_stages_as_the_sm90_compiles_advise(fake_gpu, monkeypatch):
    """Where the dots run on tensor cores and a program holds its whole slice at 32 units, it takes 32 units, one
    16-row batch tile and 4 warps (each its own 8 columns of the gate dots); else 16 units and the reduction, held
    and streamed rows alike, in 8 chunks, a warp each. float32 without TF32 (its dot on the FMA units) takes 16 units
    and 8 warps at every size (with 4 its kernels spill kilobytes a thread), in chunks where they do not spill; a small
    slice in bf16 4 warps. One pipeline stage where each group of programs has one batch tile and holds its whole
    slice, or holds it whole in chunks, or a tile's h over its held rows takes more than 16 KB; three where a group
    loops over tiles or streams rows; a forced stage count is kept (sm_90 compiles, perf/NOTES.md)."""

    def plan(cell, hidden, batch, dtype):
        return _plan.plan_layer(cell, hidden, batch, dtype, CUDA0, 1)

    def shape(p):
        return p.block_h, p.block_b, p.num_warps, p.num_programs

    def chunks(p):
        return p.k_split, p.block_k, p.num_stages

    monkeypatch.setattr(_plan, "tf32_matmul", lambda: False)
    # Its FMA dots in chunks of 16 rows or more, a warp each (4 to 8), where the gates hold at most 1024 rows together,
    # or more in two halves (LSTM and GRU from H=512: the forward's dots over 64 rows a chunk spill), with the rows
    # beyond the held 512 streamed (H=768, 1024: three stages); one stage over one tile and the whole slice held.
    installed = _plan.triton_version
    for version in ((3, 6), (3, 9)):
        monkeypatch.setattr(_plan, "triton_version", lambda version=version: version)
        fma = {(cell, H): plan(cell, H, 16, torch.float32) for cell in ("lstm", "gru", "rnn_tanh")
               for H in (32, 64, 128, 256, 512, 768, 1024)}  # fmt: skip
        assert {key: p.k_split for key, p in fma.items() if p.k_split > 1} == {
            **{(cell, 64): 4 for cell in ("lstm", "gru", "rnn_tanh")},
            **{(cell, H): 8 for cell in ("lstm", "gru", "rnn_tanh") for H in (128, 256, 512, 768, 1024)},
        }  # fmt: skip
        assert {key for key, p in fma.items() if p.held_halves} == {
            (cell, H) for cell in ("lstm", "gru") for H in (512, 768, 1024)
        }  # fmt: skip
        for cell in ("lstm", "gru"):
            assert chunks(fma[cell, 512]) == (8, 512, 1) and chunks(fma[cell, 1024]) == (8, 512, 3)
            assert fma[cell, 768].block_ks == fma[cell, 1024].block_ks == 128  # 16 streamed rows a warp
        assert all(p.backward is None for p in fma.values())  # the backward on the forward's plan
        tuned = _plan.plan_with("gru", 512, 1, CUDA0, torch.float32, 16, 16, 8, 1, 16, k_split=8)  # a tuner candidate
        assert tuned.held_halves and not _plan.plan_with("gru", 512, 1, CUDA0, torch.float32, 16, 16, 8).held_halves
        assert all(p.num_warps == max(p.k_split, 4 if p.k_split > 1 else 8) and p.block_h == 16 for p in fma.values())
        assert shape(fma["lstm", 32]) == (16, 16, 8, 2) and shape(fma["rnn_tanh", 64]) == (16, 16, 4, 4)
        assert chunks(fma["lstm", 256]) == (8, 256, 1) and chunks(plan("gru", 256, 64, torch.float32))[2] == 1
        stack = _plan.plan_stack("lstm", 256, 3, 16, torch.float32, CUDA0)  # the layer's chunks, two slices held
        assert (stack.k_split, stack.num_warps, stack.block_k) == (8, 8, 256)
    monkeypatch.setattr(_plan, "triton_version", installed)
    monkeypatch.setattr(_plan, "tf32_matmul", lambda: True)
    assert [shape(plan(cell, 64, 16, torch.float32)) for cell in ("rnn_tanh", "lstm")] == [(32, 16, 4, 2)] * 2
    split = plan("lstm", 512, 16, torch.float32)  # 256 KB at 32 units, the whole 128 KB at 16
    assert shape(split) == (16, 16, 8, 32) and chunks(split) == (8, 512, 1)
    assert shape(plan("lstm", 256, 16, torch.float32)) == (32, 16, 4, 8)  # 128 KB at 32 units
    half = plan("lstm", 1024, 16, torch.float32)  # a quarter at 32 units, half at 16: the rest streamed, in chunks too
    assert shape(half) == (16, 16, 8, 64) and chunks(half) == (8, 512, 3) and half.block_ks == 128
    assert shape(plan("rnn_tanh", 256, 16, torch.bfloat16)) == (32, 16, 4, 8)
    assert shape(plan("lstm", 512, 64, torch.bfloat16)) == (32, 16, 4, 16)  # a 128 KB slice
    # 256 KB at 32 units, the whole 128 KB at 16 in 8 chunks: two groups of 64 programs, two tiles each, one stage.
    split = plan("lstm", 1024, 64, torch.bfloat16)
    assert shape(split) == (16, 16, 8, 64) and chunks(split) == (8, 1024, 1) and split.batch_groups == 2
    assert chunks(plan("gru", 768, 16, torch.bfloat16)) == (8, 1024, 1)
    half = plan("lstm", 2048, 64, torch.bfloat16)  # a quarter at 32 units, half at 16
    assert shape(half) == (16, 16, 8, 128) and chunks(half) == (8, 1024, 3) and half.block_ks == 128
    monkeypatch.setenv("TRITONRNN_EXCHANGE", "tagged")  # the tagged exchange's kernels keep 16 units, in chunks
    tagged = plan("lstm", 512, 64, torch.bfloat16)
    assert shape(tagged) == (16, 16, 8, 32) and chunks(tagged) == (8, 512, 1)
    assert plan("lstm", 1024, 16, torch.bfloat16).k_split == 8
    assert plan("lstm", 256, 16, torch.bfloat16).k_split == 1  # chunks of 32 rows: its backward spilled
    monkeypatch.delenv("TRITONRNN_EXCHANGE")
    _plan.force_plan(block_h=16)  # a forced width: the rest of the plan as the heuristics derive it for that width
    try:
        assert shape(plan("lstm", 512, 64, torch.bfloat16)) == (16, 32, 8, 32)
    finally:
        _plan.force_plan()
    assert shape(plan("gru", 256, 16, torch.bfloat16)) == (32, 16, 4, 8)
    assert shape(plan("gru", 16, 16, torch.bfloat16)) == (16, 16, 4, 1)  # one 16-unit program
    assert plan("lstm", 512, 16, torch.bfloat16).num_stages == 1  # one tile of 16 rows
    groups = plan("lstm", 512, 64, torch.bfloat16)  # four 16-row tiles, a group each
    assert (groups.batch_groups, groups.num_stages) == (4, 1)
    looping = plan("lstm", 512, 256, torch.bfloat16)  # eight groups of 16 programs, two tiles each
    assert (looping.batch_groups, looping.num_stages) == (8, 3)
    # A tile's h over the held rows of one chunk beyond 16 KB (here 16 x 1024 in bf16, 16 x 512 in TF32): one stage
    # over several tiles too, where two or three spilled 2 KB a thread.
    wide = plan("rnn_tanh", 1024, 256, torch.bfloat16)  # four groups of 32 programs, four tiles each
    assert (wide.k_split, wide.block_k, wide.batch_groups, wide.num_stages) == (1, 1024, 4, 1)
    monkeypatch.setattr(_plan, "tf32_matmul", lambda: True)
    assert chunks(plan("rnn_tanh", 512, 256, torch.float32)) == (1, 512, 1)
    assert chunks(plan("rnn_tanh", 256, 1024, torch.float32)) == (1, 256, 3)  # 16 KB, four tiles a group
    monkeypatch.setattr(_plan, "tf32_matmul", lambda: False)
    streamed = plan("lstm", 2048, 16, torch.bfloat16)
    assert streamed.block_k < 2048 and streamed.num_stages == 3
    stack = _plan.plan_stack("gru", 256, 3, 16, torch.bfloat16, CUDA0)  # two slices of 48 KB at 32 units
    assert (stack.block_h, stack.num_warps, stack.batch_groups, stack.num_stages) == (32, 4, 1, 1)
    assert _plan.plan_stack("gru", 256, 3, 64, torch.bfloat16, CUDA0).num_stages == 3  # one group, four tiles
    narrow = _plan.plan_stack("lstm", 512, 3, 16, torch.bfloat16, CUDA0)  # two 128 KB slices do not fit at 32
    assert (narrow.block_h, narrow.num_warps, narrow.num_programs, narrow.k_split) == (16, 8, 32, 8)
    assert narrow.block_ks >= 16 * 8  # its streamed loop never runs, but is compiled
    assert isinstance(_plan.plan_stack("lstm", 1024, 3, 16, torch.bfloat16, CUDA0), str)  # two 128 KB slices at 16
    _plan.force_plan(k_split=4)
    try:
        assert _plan.plan_stack("gru", 256, 3, 16, torch.bfloat16, CUDA0).k_split == 4
    finally:
        _plan.force_plan()
    _plan.force_plan(num_stages=3)
    try:
        assert plan("lstm", 512, 16, torch.bfloat16).num_stages == 3
    finally:
        _plan.force_plan()


def test_float32_on_the_fma_units_streaming_rows_takes_two_stages_before_one(fake_gpu, monkeypatch):
    """LSTM float32 H=1024 without TF32 (8 chunks, the held rows in halves, the rest streamed): where its kernels with
    three pipeline stages need more shared memory than the GPU has, two are tried before one (two still overlap the
    streamed rows' reads from L2), both kernels on one plan. The projection's kernels take chunks without halves, and
    stages of their own: the forward holds every row of its reduction over P (one), the backward streams those of its
    reduction over H (three, then two, then one); TF32 the tensor cores, no halves."""
    from tritonrnn import layer_op, layer_run

    monkeypatch.setattr(_plan, "tf32_matmul", lambda: False)
    monkeypatch.delenv("TRITONRNN_AUTOTUNE", raising=False)
    tried = []

    def under(most_stages):
        def misfit(cell, hidden, dtype, tf32, plan, variant, index):
            tried.append((plan.num_stages, plan.for_backward().num_stages, plan.block_k))
            return "needs more shared memory" if plan.num_stages > most_stages else None

        monkeypatch.setattr(layer_op, "_gpu_misfit", misfit)
        tried.clear()
        return layer_op.kernel_plan("lstm", 1024, 16, torch.float32, CUDA0, layer_run.Variant())

    plan = under(2)  # as on sm_90 (Triton 3.6): the backward needs 264 KB with three stages, 200 KB with two
    assert (plan.k_split, plan.num_stages, plan.block_k, plan.held_halves, plan.backward) == (8, 2, 512, True, None)
    assert tried == [(3, 3, 512), (2, 2, 512)]
    plan = under(1)
    assert (plan.num_stages, plan.block_k) == (1, 512) and tried == [(3, 3, 512), (2, 2, 512), (1, 1, 512)]
    plan = under(0)  # then fewer held rows, in halves no more
    assert tried[3:] == [(1, 1, 256), (1, 1, 128), (1, 1, 64)] and isinstance(plan, str)
    monkeypatch.setattr(layer_op, "_gpu_misfit", lambda *args: None)
    proj = layer_op.kernel_plan("lstm", 1024, 16, torch.float32, CUDA0, layer_run.Variant(proj=256))
    assert (proj.k_split, proj.block_k, proj.num_stages, proj.held_halves) == (8, 512, 1, False)
    assert proj.backward == dataclasses.replace(proj, num_stages=3, backward=None)
    tried.clear()

    def backward_misfit(cell, hidden, dtype, tf32, plan, variant, index):  # as on sm_90: 3 stages over, 2 within
        tried.append((plan.num_stages, plan.for_backward().num_stages, plan.block_k))
        return "needs more shared memory" if plan.for_backward().num_stages > 2 else None

    monkeypatch.setattr(layer_op, "_gpu_misfit", backward_misfit)
    proj = layer_op.kernel_plan("lstm", 1024, 16, torch.float32, CUDA0, layer_run.Variant(proj=256))
    assert (proj.num_stages, proj.backward.num_stages) == (1, 2) and tried == [(1, 3, 512), (1, 2, 512)]
    monkeypatch.setattr(_plan, "tf32_matmul", lambda: True)
    tf32 = _plan.plan_layer("lstm", 1024, 16, torch.float32, CUDA0, 1)
    assert not tf32.held_halves and not _plan.plan_layer("lstm", 512, 16, torch.float32, CUDA0, 1).held_halves


def test_a_layer_run_as_one_group_counts_its_stages_on_that_groups_tiles(fake_gpu, monkeypatch):
    """The projection's kernels and the stream wavefront's layers run the whole batch in one group: at B=64 that group
    loops over tiles and keeps three stages, where groups of one tile each take one."""
    from tritonrnn import layer_op, layer_run

    monkeypatch.delenv("TRITONRNN_AUTOTUNE", raising=False)
    monkeypatch.setattr(layer_op, "_gpu_misfit", lambda *args: None)

    def plan(batch, proj=0, one_group=False):
        variant = layer_run.Variant(proj=proj)
        return layer_op.kernel_plan("lstm", 256, batch, torch.bfloat16, CUDA0, variant, one_group=one_group)

    assert (plan(64).batch_groups, plan(64).num_stages) == (4, 1)  # four 16-row tiles, a group each
    for one in (plan(64, proj=64), plan(64, one_group=True)):  # two 32-row tiles (the projection), four of 16
        assert (one.batch_groups, one.num_stages) == (1, 3)
    for one in (plan(16, proj=64), plan(16, one_group=True)):
        assert (one.batch_groups, one.num_stages) == (1, 1)
    # With a projection over one tile: the forward holds every row of its reduction over P (one stage), the backward
    # streams rows of its reduction over H (three)
    held = layer_op.kernel_plan("lstm", 2048, 16, torch.bfloat16, CUDA0, layer_run.Variant(proj=64))
    assert held.block_k < 2048 and (held.num_stages, held.backward.num_stages) == (1, 3)


def test_a_three_stage_plan_over_shared_memory_with_one_batch_tile_drops_stages_before_rows():
    """A tuned plan of three stages at one batch tile: smaller_plan tries two stages, then one, before it halves the
    held rows; a tuned backward of its own takes as many stages at most."""
    backward = _plan.LayerPlan(block_h=16, block_b=16, block_k=512, num_programs=32, num_warps=8, persistent=True,
                               k_split=8, num_stages=1)  # fmt: skip
    tuned = _plan.LayerPlan(block_h=16, block_b=16, block_k=512, num_programs=32, num_warps=8, persistent=True)
    for backward_plan in (None, backward):
        tuned = dataclasses.replace(tuned, backward=backward_plan)
        two = _plan.smaller_plan(tuned, tuned, 16)
        assert two.num_stages == 2 and two.block_k == 512
        one = _plan.smaller_plan(two, tuned, 16)
        assert one.num_stages == 1 and one.block_k == 512
        if backward_plan:
            assert one.backward.num_stages == two.backward.num_stages == 1
        assert _plan.smaller_plan(one, tuned, 16).block_k == 256


def test_a_plan_over_shared_memory_with_several_batch_tiles_keeps_the_pipeline_first(fake_gpu, monkeypatch):
    """Several batch tiles a group (B=256: 8 groups of 32 rows in tiles of 16): fewer held rows with the pipeline
    kept; where no number of rows fits, one stage from the whole slice again."""
    heuristic = _plan.plan_layer("lstm", 512, 256, torch.bfloat16, CUDA0, 1)
    assert heuristic.num_stages == 3 and heuristic.block_k == 512
    assert -(-256 // heuristic.batch_groups) > heuristic.block_b
    plan = _plan_under(monkeypatch, 256, 0, lambda stages, rows: rows <= 256)
    assert plan.num_stages == 3 and plan.block_k == 256
    plan = _plan_under(monkeypatch, 256, 0, lambda stages, rows: stages == 1)
    assert plan.num_stages == 1 and plan.block_k == 512


def test_a_fused_stack_over_shared_memory_takes_one_stage(fake_gpu, monkeypatch):
    """The stack kernel's plan on the GPU: where three pipeline stages do not fit shared memory, one is tried before
    the stack is refused (and runs layer by layer); the tagged exchange keeps its precedence."""
    from tritonrnn import fused_stack

    monkeypatch.setenv("TRITONRNN_EXCHANGE", "tagged")
    tried = []

    def misfit(cell, hidden, layers, dtype, tf32, plan, mode, index):
        tried.append((plan.tagged, plan.num_stages))
        return None if plan.num_stages == 1 and not plan.tagged else "needs more shared memory"

    monkeypatch.setattr(fused_stack, "_gpu_misfit", misfit)
    # B=64: two batch tiles of 32 rows in the stack kernel's one group, so three stages first (H=256: 16 units, one
    # chunk with the tagged exchange; a reduction in chunks takes one stage, as at H=512)
    plan = fused_stack.fused_plan(["lstm"] * 3, [256] * 3, 64, torch.bfloat16, CUDA0, 0)
    assert isinstance(plan, _plan.LayerPlan) and plan.num_stages == 1 and not plan.tagged
    assert tried == [(True, 3), (True, 1), (False, 3), (False, 1)]
    tried.clear()  # B=16, one tile: one stage from the start
    plan = fused_stack.fused_plan(["lstm"] * 3, [256] * 3, 16, torch.bfloat16, CUDA0, 0)
    assert isinstance(plan, _plan.LayerPlan) and plan.num_stages == 1 and tried == [(True, 1), (False, 1)]
    tried.clear()
    plan = fused_stack.fused_plan(["lstm"] * 3, [512] * 3, 64, torch.bfloat16, CUDA0, 0)
    assert isinstance(plan, _plan.LayerPlan) and plan.num_stages == 1 and tried == [(True, 1), (False, 1)]
