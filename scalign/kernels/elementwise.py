"""CuPy ``ElementwiseKernel`` definitions kept apart from CuPy.

Each CUDA kernel of the package is an :class:`Elementwise`: its parameters, its CUDA C
operation and preamble as plain strings, which :func:`compiled` hands to CuPy (once per
definition). Kept as data, the same definitions are compiled with NVRTC and run in a CPU
emulation by the tests, where there is no GPU.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple


class Elementwise(NamedTuple):
    """The arguments of ``cupy.ElementwiseKernel``: ``in_params``, ``out_params`` (CuPy's
    ``"float64 x, raw T y"`` lists), the ``operation`` run per element, the kernel's
    ``name`` and the ``preamble`` of device functions it calls."""

    in_params: str
    out_params: str
    operation: str
    name: str
    preamble: str = ""


@functools.cache
def compiled(kernel: Elementwise) -> Any:
    """The ``cupy.ElementwiseKernel`` of ``kernel`` (CuPy compiles it on first use)."""
    import cupy

    return cupy.ElementwiseKernel(
        kernel.in_params,
        kernel.out_params,
        kernel.operation,
        kernel.name,
        preamble=kernel.preamble,
    )
