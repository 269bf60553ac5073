"""tritonrnn: torch.nn.LSTM / GRU / RNN on persistent Triton kernels.

Switch with one import: ``from tritonrnn import LSTM``. Parameters, state_dict, arguments and
input/output conventions are torch.nn's.
"""

from tritonrnn import functional, reference
from tritonrnn.modules import GRU, LSTM, RNN

__all__ = ["GRU", "LSTM", "RNN", "functional", "reference"]
__version__ = "0.1.0"
