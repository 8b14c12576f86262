"""Run a CUDA kernel's own source on the CPU (tests only): no GPU needed.

g++ compiles the source with a prelude that gives CUDA's thread model: one ``std::thread``
per CUDA thread, the blocks one after another (so ``__shared__`` variables can be function
statics), ``__syncthreads`` a barrier of the block, and the warp shuffles an exchange
through a per-warp slot array between two barriers of the warp. Enough for the kernels'
indexing, grid-stride loops and warp-synchronous reductions, which is what goes wrong in
them; not a memory model, and no timings. 1-D grids and blocks of whole warps only.
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
    code = PRELUDE + source + launcher
    digest = hashlib.sha1(code.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "scalign-cuda-emulation"
    folder.mkdir(exist_ok=True)
    library = folder / f"{kernel}-{digest}.so"
    if not library.exists():
        cpp = folder / f"{kernel}-{digest}.cpp"
        cpp.write_text(code)
        built = folder / f"{kernel}-{digest}.{id(code)}.so"
        subprocess.run(
            [compiler(), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", str(cpp)]
            + ["-o", str(built)],
            check=True,
            capture_output=True,
        )
        built.replace(library)
    lib = ctypes.CDLL(str(library))
    lib.launch.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
    return lib


def launch(lib: ctypes.CDLL, grid: int, block: int, args: list) -> None:
    """Run the kernel on ``grid`` blocks of ``block`` threads; ``args``: C-contiguous NumPy
    arrays for pointers, NumPy scalars of the exact C type for values."""
    if block % 32:
        raise ValueError(f"blocks of whole warps only, got {block} threads")
    held = [np.ascontiguousarray(a) if isinstance(a, np.ndarray) else np.array(a) for a in args]
    pointers = (ctypes.c_void_p * len(held))(*(a.ctypes.data for a in held))
    lib.launch(grid, block, pointers)
