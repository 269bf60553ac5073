"""The wheel built from the repository ships the kernels as tritonrnn.kernels, and no bare `kernels`."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_contains_the_kernels_under_tritonrnn(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("tritonrnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tritonrnn/kernels/recurrent.py" in names
    assert "tritonrnn/kernels/__init__.py" in names
    assert "tritonrnn/py.typed" in names
    assert not [n for n in names if n.startswith("kernels/")]


def test_installed_package_imports_the_kernels_from_tritonrnn():
    import tritonrnn.kernels.recurrent as recurrent

    assert pathlib.Path(recurrent.__file__).parent.name == "kernels"
    assert hasattr(recurrent, "rnn_fwd_kernel") and hasattr(recurrent, "rnn_bwd_kernel")
