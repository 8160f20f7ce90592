"""BLAS threads on CPU (private): keep LAPACK from competing with XLA for the cores.

XLA already spreads its own work over every core. The LAPACK calls inside a jitted step (the
row-space Cholesky) run through scipy's OpenBLAS, whose worker threads then compete with XLA's
threads; on the 2-core CPU here the EGN step of the 784-256-256-10 softmax problem went from 54 ms
to 33 ms with one OpenBLAS thread (the Cholesky alone is no faster with two). Our own processes
(the CLI, the benchmarks) therefore use one BLAS thread unless ``OPENBLAS_NUM_THREADS`` is set.
"""

from __future__ import annotations

import os


def limit_blas_threads(threads: int | None = None) -> bool:
    """Limit the loaded BLAS libraries to ``threads`` (default 1; no-op when
    ``OPENBLAS_NUM_THREADS`` is set or threadpoolctl is missing). Returns whether a limit was set."""
    if threads is None:
        if "OPENBLAS_NUM_THREADS" in os.environ:
            return False
        threads = 1
    try:
        import scipy.linalg.cython_lapack  # noqa: F401  (loads the OpenBLAS that jaxlib's LAPACK uses)
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(threads, user_api="blas")
    return True
