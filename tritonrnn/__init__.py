"""tritonrnn: torch.nn.LSTM / GRU / RNN on persistent Triton kernels.

Switch with one import: ``from tritonrnn import LSTM``. Parameters, state_dict, arguments and
input/output conventions are torch.nn's.
"""

import importlib.util
import pathlib
import sys

# Installed, the kernels are the subpackage tritonrnn/kernels. In a source tree used without installing
# (PYTHONPATH=., as on the device machine) they sit beside the package in ../kernels: register them
# under the same name, so both layouts import `tritonrnn.kernels`.
_here = pathlib.Path(__file__).resolve().parent
if not (_here / "kernels").is_dir() and (_here.parent / "kernels" / "__init__.py").is_file():
    _spec = importlib.util.spec_from_file_location(
        "tritonrnn.kernels",
        _here.parent / "kernels" / "__init__.py",
        submodule_search_locations=[str(_here.parent / "kernels")],
    )
    sys.modules["tritonrnn.kernels"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["tritonrnn.kernels"])

from tritonrnn import functional, reference  # noqa: E402
from tritonrnn.modules import GRU, LSTM, RNN  # noqa: E402
from tritonrnn.stacked import StackedRNN  # noqa: E402
from tritonrnn.tbptt import detach_states, hold_dropout_masks  # noqa: E402

__all__ = ["GRU", "LSTM", "RNN", "StackedRNN", "detach_states", "functional", "hold_dropout_masks", "reference"]
__version__ = "0.1.0"
