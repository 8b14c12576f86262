"""Run a CUDA kernel's own source on the CPU (tests only): no GPU needed.

A raw kernel (:func:`build`, :func:`launch`): g++ compiles the source with a prelude
that gives CUDA's thread model: one ``std::thread`` per CUDA thread, the blocks one after
another (so ``__shared__`` variables can be function statics), ``__syncthreads`` a barrier
of the block, and the warp shuffles an exchange through a per-warp slot array between two
barriers of the warp. Enough for the kernels' indexing, grid-stride loops and
warp-synchronous reductions, which is what goes wrong in them; not a memory model, and no
timings. 1-D grids and blocks of whole warps only.

An elementwise kernel (:func:`elementwise`, a
:class:`scalign.kernels.elementwise.Elementwise`): its operation in a loop over the
broadcast elements, with CuPy's argument conventions (``raw`` arrays, type placeholders).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

PRELUDE = r"""
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
struct Warp { std::barrier<> bar{32}; unsigned long long slot[32]; };
static thread_local Warp* this_warp;
static thread_local std::barrier<>* this_block;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
static inline void __syncthreads() { this_block->arrive_and_wait(); }
template <class T> static inline T __shfl_down_sync(unsigned, T v, int delta) {
    const int lane = threadIdx.x & 31;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    this_warp->slot[lane] = bits;
    this_warp->bar.arrive_and_wait();
    const unsigned long long got = lane + delta < 32 ? this_warp->slot[lane + delta] : bits;
    this_warp->bar.arrive_and_wait();
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}
struct float4 { float x, y, z, w; };
"""

LAUNCHER = r"""
extern "C" void launch(unsigned grid, unsigned block, void** args) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> block_barrier(block);
        std::vector<Warp> warps(block / 32);
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t)
            threads.emplace_back([&, t, b] {
                threadIdx.x = t;
                blockIdx.x = b;
                this_warp = &warps[t / 32];
                this_block = &block_barrier;
                KERNEL(CALL_ARGS);
            });
        for (auto& thread : threads) thread.join();
    }
}
"""


@functools.cache
def compiler() -> str | None:
    """A g++ that compiles the prelude (C++20's ``std::barrier``); None: tests skip."""
    gxx = shutil.which("g++")
    if gxx is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        cpp = Path(folder) / "prelude.cpp"
        cpp.write_text(PRELUDE)
        done = subprocess.run(
            [gxx, "-std=c++20", "-fsyntax-only", "-pthread", str(cpp)], capture_output=True
        )
    return gxx if done.returncode == 0 else None


def build(source: str, kernel: str, params: list[str]) -> ctypes.CDLL:
    """Compile ``kernel`` of ``source`` with the emulation; ``params`` are its parameters'
    C types in order (``"const float*"``, ``"long long"``...)."""
    casts = [
        f"({p})args[{i}]" if p.endswith("*") else f"*({p}*)args[{i}]" for i, p in enumerate(params)
    ]
    launcher = LAUNCHER.replace("KERNEL", kernel).replace("CALL_ARGS", ", ".join(casts))
    lib = _compile(PRELUDE + source + launcher, kernel)
    lib.launch.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
    return lib


def launch(lib: ctypes.CDLL, grid: int, block: int, args: list) -> None:
    """Run the kernel on ``grid`` blocks of ``block`` threads; ``args``: C-contiguous NumPy
    arrays for pointers, NumPy scalars of the exact C type for values."""
    if block % 32:
        raise ValueError(f"blocks of whole warps only, got {block} threads")
    if any(isinstance(a, np.ndarray) and not a.flags.c_contiguous for a in args):
        raise ValueError("array arguments must be C-contiguous (the kernel indexes them flat)")
    held = [a if isinstance(a, np.ndarray) else np.array(a) for a in args]
    pointers = (ctypes.c_void_p * len(held))(*(a.ctypes.data for a in held))
    lib.launch(grid, block, pointers)


#: CuPy's dtype names as C++ types (CuPy's complex<T> as std::complex<T>).
_C_TYPES = {
    "float64": "double",
    "float32": "float",
    "bool": "bool",
    "int32": "int",
    "int64": "long long",
    "complex64": "std::complex<float>",
    "complex128": "std::complex<double>",
}

_ELEMENTWISE_PRELUDE = r"""
#include <cmath>
#include <complex>
#define __device__ static inline
#define __forceinline__
using namespace std;
"""


def _params(spec: str) -> list[tuple[str, str, bool]]:
    """``(type, name, raw)`` of each item of a CuPy parameter list."""
    out = []
    for item in spec.split(","):
        words = item.split()
        raw = words[0] == "raw"
        type_name, name = words[1:] if raw else words
        out.append((type_name, name, raw))
    return out


def elementwise(kernel, *args: np.ndarray | np.generic) -> tuple[np.ndarray, ...]:
    """Run a :class:`scalign.kernels.elementwise.Elementwise` on NumPy inputs as CuPy runs
    it: the inputs broadcast (``raw`` ones passed whole, indexed flat), the operation on
    each element ``i`` in turn, a type placeholder (``T``) bound to the dtype of its first
    argument. The outputs follow the inputs, as in CuPy: all of them (C-contiguous, of
    their declared dtypes, written in place), or none and they are allocated (then none
    may be ``raw``). Returns the outputs."""
    inputs, outputs = _params(kernel.in_params), _params(kernel.out_params)
    if len(args) not in (len(inputs), len(inputs) + len(outputs)):
        raise ValueError(
            f"{kernel.name} takes {len(inputs)} inputs, then optionally its {len(outputs)} "
            f"outputs, got {len(args)} arguments"
        )
    arrays = [np.asarray(a) for a in args[: len(inputs)]]
    given = args[len(inputs) :]
    bound: dict[str, str] = {}
    for (type_name, _, _), a in zip(inputs, arrays, strict=True):
        if type_name not in _C_TYPES:
            bound.setdefault(type_name, a.dtype.name)

    def dtype(type_name: str) -> np.dtype:
        return np.dtype(bound.get(type_name, type_name))

    shape = np.broadcast_shapes(*(a.shape for a, p in zip(arrays, inputs, strict=True) if not p[2]))
    held = [
        np.ascontiguousarray(
            a.astype(dtype(t)) if raw else np.broadcast_to(a.astype(dtype(t)), shape)
        )
        for a, (t, _, raw) in zip(arrays, inputs, strict=True)
    ]
    if not given:
        if any(raw for _, _, raw in outputs):
            raise ValueError(f"{kernel.name} has raw outputs: pass all its outputs")
        given = tuple(np.empty(shape, dtype=dtype(t)) for t, _, _ in outputs)
    for a, (t, name, raw) in zip(given, outputs, strict=True):
        if not (
            isinstance(a, np.ndarray)
            and a.flags.c_contiguous
            and a.dtype == dtype(t)
            and (raw or a.shape == shape)
        ):
            raise ValueError(f"output {name} must be a C-contiguous {dtype(t)} array")
    signature, loads = ["long long n_"], []
    for k, (t, name, raw) in enumerate(inputs):
        c = _C_TYPES[dtype(t).name]
        signature.append(f"const {c}* {name if raw else f'in{k}_'}")
        if not raw:
            loads.append(f"const {c} {name} = in{k}_[i];")
    for k, (t, name, raw) in enumerate(outputs):
        c = _C_TYPES[dtype(t).name]
        signature.append(f"{c}* {name if raw else f'out{k}_'}")
        if not raw:
            loads.append(f"{c}& {name} = out{k}_[i];")
    typedefs = "".join(f"typedef {_C_TYPES[d]} {p};\n" for p, d in sorted(bound.items()))
    code = (
        _ELEMENTWISE_PRELUDE
        + typedefs
        + kernel.preamble
        + f'\nextern "C" void run({", ".join(signature)}) {{\n'
        + "for (long long i = 0; i < n_; ++i) {\n"
        + "\n".join(loads)
        + "\n{\n"
        + kernel.operation
        + "\n}\n}\n}\n"
    )
    lib = _compile(code, kernel.name)
    pointers = [ctypes.c_void_p(a.ctypes.data) for a in held + list(given)]
    lib.run(ctypes.c_longlong(int(np.prod(shape))), *pointers)
    return tuple(given)


def _compile(code: str, name: str) -> ctypes.CDLL:
    """``code`` built into a shared library once (cached by its hash in the temp folder)."""
    digest = hashlib.sha1(code.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "scalign-cuda-emulation"
    folder.mkdir(exist_ok=True)
    library = folder / f"{name}-{digest}.so"
    if not library.exists():
        cpp = folder / f"{name}-{digest}.cpp"
        cpp.write_text(code)
        built = folder / f"{name}-{digest}.{id(code)}.so"
        subprocess.run(
            [compiler(), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", str(cpp)]
            + ["-o", str(built)],
            check=True,
            capture_output=True,
        )
        built.replace(library)
    return ctypes.CDLL(str(library))
