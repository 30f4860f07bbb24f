"""A sparse-times-dense kernel for pruned linears, on Numba (BSD-licensed, pip wheels, no
compiler needed): ``y^T = W x^T`` with ``W`` (out x in) stored as CSR and the activations
feature-major (one contiguous row of tokens per feature).

Why feature-major: each non-zero weight ``W[n, k]`` then scales one contiguous row of tokens
``x^T[k, :]`` into one output row ``y^T[n, :]``, a loop the compiler turns into SIMD FMAs, so
the kernel streams its operands and never touches a zero. Token-major activations would need a
gather per non-zero instead. torch's CSR kernels (the ``pytorch-csr`` engine) and ONNX
Runtime's ``SparseToDenseMatMul`` (29 ms where the dense MatMul takes 1.4 ms, measured on the
default model's intermediate linear at 95%) fall short, which is why this kernel exists.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numba
import numpy as np

# Non-zeros taken together in the inner loop: one load and store of the output row per group
# instead of per non-zero (measured on the default model's 95% linears, 1 thread: 4 beat 2, 8
# and 16).
GROUP = 4


@dataclass(frozen=True)
class CSRMatrix:
    """``W`` (out x in) with its zeros left out: row ``n``'s non-zeros are
    ``data[indptr[n]:indptr[n + 1]]`` at input columns ``indices[...]``."""

    indptr: np.ndarray  # int32, out + 1
    indices: np.ndarray  # int32, nnz
    data: np.ndarray  # float32, nnz
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, weight: np.ndarray) -> "CSRMatrix":
        weight = np.asarray(weight, dtype=np.float32)
        rows, cols = np.nonzero(weight)  # row-major order: each row's columns ascending
        indptr = np.zeros(weight.shape[0] + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=weight.shape[0]), out=indptr[1:])
        return cls(indptr, cols.astype(np.int32), weight[rows, cols], tuple(weight.shape))

    @property
    def sparsity(self) -> float:
        return 1.0 - len(self.data) / (self.shape[0] * self.shape[1])

    def matmul_t(self, x_t: np.ndarray, threads: int = 1, bias: np.ndarray | None = None) -> np.ndarray:
        """``W @ x_t (+ bias)`` for feature-major ``x_t`` (in x tokens), as a new (out x tokens)
        array, its rows split over up to ``threads`` threads when the product is large enough to
        pay for it."""
        x_t = np.ascontiguousarray(x_t, dtype=np.float32)
        if x_t.ndim != 2 or x_t.shape[0] != self.shape[1]:
            raise ValueError(f"expected ({self.shape[1]}, tokens) activations, got {x_t.shape}")
        out = np.empty((self.shape[0], x_t.shape[1]), dtype=np.float32)
        bias = np.zeros(self.shape[0], np.float32) if bias is None else np.asarray(bias, dtype=np.float32)
        parts = self.row_split(threads if len(self.data) * x_t.shape[1] >= PARALLEL_MIN_WORK else 1)
        helpers = [_pool().submit(_csr_times_dense, self.indptr, self.indices, self.data, bias, x_t, out, first, last)
                   for first, last in parts[1:]]
        _csr_times_dense(self.indptr, self.indices, self.data, bias, x_t, out, *parts[0])
        for helper in helpers:
            helper.result()
        return out

    def row_split(self, parts: int) -> list[tuple[int, int]]:
        """Up to ``parts`` contiguous row ranges holding about as many non-zeros each."""
        targets = np.arange(1, parts) * len(self.data) / parts
        bounds = [0, *np.searchsorted(self.indptr, targets).tolist(), self.shape[0]]
        return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a] or [(0, self.shape[0])]


# Threads: the kernel releases the GIL, and row ranges go to plain Python threads that sleep
# between calls. Numba's own parallel loops lost everywhere they were tried (2-core AMD EPYC, 95%
# default model, ONNX Runtime on both cores between the kernels, batch 1): on its OpenMP threads
# the engine ran at half its one-thread speed (32.7 against 63.3 items/s), and its workqueue
# costs more to wake than the batch-1 kernels take (42 items/s against 65 with the kernel on one
# thread).
# Below this many multiply-adds a product stays on the calling thread: handing a range over costs
# about what it saves at batch 1 (the default model's intermediate linear at 95%, 128 tokens: 3.8 M,
# no faster split over 2 cores), while at 2,048 tokens a split ran 1.5-1.8x faster.
PARALLEL_MIN_WORK = 8_000_000
_POOL = None
_POOL_LOCK = threading.Lock()


def _pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            from sparsebert.hardware import physical_cores

            _POOL = ThreadPoolExecutor(max_workers=max(1, physical_cores() - 1), thread_name_prefix="sparse-kernel")
        return _POOL


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there, and a pool that thinks
    they do never runs what it is given."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


# fastmath lets the compiler reorder each output's sum (within float32 rounding of the dense
# result: parity is checked at 1e-4 a logit). cache: compiled once, kept on disk by Numba.
@numba.njit(fastmath=True, cache=True, nogil=True)
def _csr_times_dense(indptr, indices, data, bias, x_t, out, first, last):
    """Rows first..last-1 of out = W @ x_t + bias, W as CSR: each non-zero adds a scaled row of
    x_t to its output row."""
    for n in range(first, last):
        acc = out[n]
        acc[:] = bias[n]
        p, end = indptr[n], indptr[n + 1]
        while p + GROUP <= end:
            k0, k1, k2, k3 = indices[p], indices[p + 1], indices[p + 2], indices[p + 3]
            w0, w1, w2, w3 = data[p], data[p + 1], data[p + 2], data[p + 3]
            for t in range(x_t.shape[1]):
                acc[t] += w0 * x_t[k0, t] + w1 * x_t[k1, t] + w2 * x_t[k2, t] + w3 * x_t[k3, t]
            p += GROUP
        while p < end:
            k, w = indices[p], data[p]
            for t in range(x_t.shape[1]):
                acc[t] += w * x_t[k, t]
            p += 1
