"""The perf scripts run (tiny sizes on the CPU): they must not rot between device sessions."""

from perf import bench_core


def test_bench_core_smoke_writes_rows(tmp_path):
    df = bench_core.main(["--smoke", "--out", str(tmp_path / "core.csv")])
    assert (tmp_path / "core.csv").exists()
    assert set(df["provider"]) == {"tritonrnn", "torch_cpu"}
    assert set(df["pass_"]) == {"fwd", "fwd+bwd"}
    assert (df["ms_median"] > 0).all()
