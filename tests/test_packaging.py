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


def test_the_kernels_import_as_tritonrnn_kernels_never_as_a_bare_kernels():
    """Installed (tritonrnn/kernels) or from a source tree (../kernels registered by tritonrnn/__init__.py), the kernels
    are the modules tritonrnn.kernels.*; nothing imports a top-level `kernels`, which would be another copy of them
    (and of Triton's JIT caches) beside tritonrnn's."""
    import tritonrnn.kernels.recurrent as recurrent

    assert recurrent.__name__ == "tritonrnn.kernels.recurrent" and recurrent.__spec__.name == recurrent.__name__
    assert pathlib.Path(recurrent.__file__).parent.name == "kernels"
    assert hasattr(recurrent, "rnn_fwd_kernel") and hasattr(recurrent, "rnn_bwd_kernel")
    assert not [name for name in sys.modules if name == "kernels" or name.startswith("kernels.")]
