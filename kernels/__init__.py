"""Triton kernels of tritonrnn (installed as ``tritonrnn.kernels``).

Only ``@triton.jit`` code lives here; the launchers and all host logic are in ``tritonrnn/``.
"""
