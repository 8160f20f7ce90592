"""Linear-quadratic regulators for the RL experiments: COMPleib AC1 and BDT1, exact solutions.

Continuous-time systems ``ẋ = A_c x + B_c u`` are discretized by zero-order hold with step ``dt``:

    exp(dt [[A_c, B_c], [0, 0]]) = [[A, B], [0, I]]        (x_{t+1} = A x_t + B u_t)

Stage cost ``c(x, u) = xᵀ Q x + uᵀ R u``, discount ``γ``. The Q-function of a linear policy
``u = K x`` is quadratic, ``q_K(x, u) = zᵀ H_K z`` with ``z = [x; u]``, where ``P_K`` (the value
``V_K(x) = xᵀ P_K x``) solves the discrete Lyapunov equation

    P_K = Q + Kᵀ R K + γ (A + B K)ᵀ P_K (A + B K)

and ``H_K = [[Q + γ AᵀP_K A, γ AᵀP_K B], [γ BᵀP_K A, R + γ BᵀP_K B]]``. The optimal ``P*`` solves
the discounted DARE, i.e. the ordinary DARE of ``(√γ A, √γ B, Q, R)``; ``H*`` is the same formula
with ``P*`` and ``K* = −H*_uu⁻¹ H*_ux``.

The exact solutions use NumPy/SciPy in float64 (they are references, computed once); the pieces
used inside training loops (:func:`gain_from_h`, :func:`triu_to_sym`, :func:`q_value`) are JAX.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

__all__ = [
    "LQRSystem",
    "ac1_matrices",
    "bdt1_matrices",
    "zoh",
    "make_system",
    "dare",
    "optimal_h",
    "h_of_gain",
    "gain_from_h",
    "stabilizing_gain",
    "spectral_radius",
    "num_features",
    "triu_to_sym",
    "sym_to_triu",
    "q_value",
    "SYSTEMS",
]


@dataclass(frozen=True)
class LQRSystem:
    """A discrete-time discounted LQR problem (all arrays float64 NumPy).

    Attributes:
        name: system name (e.g. "AC1").
        A, B: discrete dynamics ``x' = A x + B u`` (``(n_x, n_x)``, ``(n_x, n_u)``).
        Q, R: stage cost weights (symmetric positive (semi-)definite).
        gamma: discount factor in (0, 1].
        dt: sampling time used for the zero-order hold (None for a system given in discrete time).
    """

    name: str
    A: np.ndarray
    B: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    gamma: float
    dt: float | None = None

    @property
    def n_x(self) -> int:
        return int(self.A.shape[0])

    @property
    def n_u(self) -> int:
        return int(self.B.shape[1])

    @property
    def n_z(self) -> int:
        return self.n_x + self.n_u


def ac1_matrices() -> tuple[np.ndarray, np.ndarray]:
    """COMPleib AC1 (aircraft), continuous time: ``A_c`` (5 x 5), ``B_c`` (5 x 3)."""
    a = np.array(
        [
            [0.0, 0.0, 1.132, 0.0, -1.0],
            [0.0, -0.0538, -0.1712, 0.0, 0.0705],
            [0.0, 0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0485, 0.0, -0.8556, -1.013],
            [0.0, -0.2909, 0.0, 1.0532, -0.6859],
        ]
    )
    b = np.array(
        [
            [0.0, 0.0, 0.0],
            [-0.12, 1.0, 0.0],
            [0.0, 0.0, 0.0],
            [4.419, 0.0, -1.665],
            [1.575, 0.0, -0.0732],
        ]
    )
    return a, b


def bdt1_matrices() -> tuple[np.ndarray, np.ndarray]:
    """COMPleib BDT1 (binary distillation tower), continuous time: ``A_c`` (11 x 11), ``B_c``."""
    nonzeros = {
        (1, 1): -0.014, (1, 2): 0.0043,
        (2, 1): 0.0095, (2, 2): -0.0138, (2, 3): 0.0046, (2, 11): 0.0005,
        (3, 2): 0.0095, (3, 3): -0.0141, (3, 4): 0.0063, (3, 11): 0.0002,
        (4, 3): 0.0095, (4, 4): -0.0158, (4, 5): 0.011,
        (5, 4): 0.0095, (5, 5): -0.0312, (5, 6): 0.015,
        (6, 5): 0.0202, (6, 6): -0.0352, (6, 7): 0.022,
        (7, 6): 0.0202, (7, 7): -0.0422, (7, 8): 0.028,
        (8, 7): 0.0202, (8, 8): -0.0482, (8, 9): 0.037, (8, 11): 0.0002,
        (9, 8): 0.0202, (9, 9): -0.0572, (9, 10): 0.042, (9, 11): 0.0005,
        (10, 9): 0.0202, (10, 10): -0.0483, (10, 11): 0.0005,
        (11, 1): 0.0255, (11, 10): 0.0255, (11, 11): -0.0185,
    }  # fmt: skip
    a = np.zeros((11, 11))
    for (i, j), v in nonzeros.items():
        a[i - 1, j - 1] = v
    b = np.array(
        [
            [0.0, 0.0, 0.0],
            [5e-6, -4e-5, 0.0025],
            [2e-6, -2e-5, 0.005],
            [1e-6, -1e-5, 0.005],
            [0.0, 0.0, 0.005],
            [0.0, 0.0, 0.005],
            [-5e-6, 1e-5, 0.005],
            [-1e-5, 3e-5, 0.005],
            [-4e-5, 5e-6, 0.0025],
            [-2e-5, 2e-6, 0.0025],
            [0.00046, 0.00046, 0.0],
        ]
    )
    return a, b


SYSTEMS = {"AC1": ac1_matrices, "BDT1": bdt1_matrices}


def zoh(a_c: np.ndarray, b_c: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Zero-order-hold discretization: ``exp(dt [[A_c, B_c], [0, 0]]) = [[A, B], [0, I]]``."""
    from scipy.linalg import expm

    a_c = np.asarray(a_c, dtype=np.float64)
    b_c = np.asarray(b_c, dtype=np.float64)
    if dt <= 0:
        raise ValueError(f"dt must be positive, got {dt}; use e.g. dt=0.1.")
    n, m = b_c.shape
    if a_c.shape != (n, n):
        raise ValueError(f"A_c must be ({n}, {n}) to match B_c {b_c.shape}, got {a_c.shape}.")
    aug = np.zeros((n + m, n + m))
    aug[:n, :n] = a_c
    aug[:n, n:] = b_c
    e = expm(dt * aug)
    return e[:n, :n], e[:n, n:]


def make_system(name: str, *, dt: float = 0.1, gamma: float = 0.99) -> LQRSystem:
    """The named COMPleib system ("AC1" or "BDT1"), ZOH-discretized, with ``Q = I``, ``R = I``."""
    key = name.upper()
    if key not in SYSTEMS:
        raise ValueError(f"unknown LQR system {name!r}; known: {', '.join(SYSTEMS)}.")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}.")
    a, b = zoh(*SYSTEMS[key](), dt)
    n, m = b.shape
    return LQRSystem(key, a, b, np.eye(n), np.eye(m), float(gamma), float(dt))


def dare(sys: LQRSystem) -> np.ndarray:
    """``P*`` of the discounted DARE: the DARE of ``(√γ A, √γ B, Q, R)`` (SciPy, float64).

    ``P = Q + γ AᵀPA − γ² AᵀPB (R + γ BᵀPB)⁻¹ BᵀPA``.
    """
    from scipy.linalg import solve_discrete_are

    s = np.sqrt(sys.gamma)
    p = solve_discrete_are(s * sys.A, s * sys.B, sys.Q, sys.R)
    return 0.5 * (p + p.T)


def _h_from_p(sys: LQRSystem, p: np.ndarray) -> np.ndarray:
    g, a, b = sys.gamma, sys.A, sys.B
    top = np.hstack([sys.Q + g * a.T @ p @ a, g * a.T @ p @ b])
    bot = np.hstack([g * b.T @ p @ a, sys.R + g * b.T @ p @ b])
    h = np.vstack([top, bot])
    return 0.5 * (h + h.T)


def optimal_h(sys: LQRSystem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(H*, K*, P*)``: optimal Q matrix, gain ``K* = −H*_uu⁻¹ H*_ux`` and value matrix."""
    p = dare(sys)
    h = _h_from_p(sys, p)
    n = sys.n_x
    k = -np.linalg.solve(h[n:, n:], h[n:, :n])
    return h, k, p


def h_of_gain(sys: LQRSystem, gain: np.ndarray) -> np.ndarray:
    """``H_K`` of the linear policy ``u = K x`` (policy evaluation, float64).

    ``P_K`` solves the discrete Lyapunov equation ``P = Q + KᵀRK + γ LᵀPL`` with ``L = A + B K``
    (requires ``√γ ρ(L) < 1``), then ``H_K`` follows the formula of the module docstring.
    """
    from scipy.linalg import solve_discrete_lyapunov

    gain = np.asarray(gain, dtype=np.float64)
    if gain.shape != (sys.n_u, sys.n_x):
        raise ValueError(
            f"gain must have shape (n_u, n_x) = {(sys.n_u, sys.n_x)}, got {gain.shape}."
        )
    closed = sys.A + sys.B @ gain
    rho = spectral_radius(closed)
    if np.sqrt(sys.gamma) * rho >= 1.0:
        raise ValueError(
            f"the gain does not stabilize the discounted system: sqrt(gamma)*rho(A+BK) = "
            f"{np.sqrt(sys.gamma) * rho:.4f} >= 1, so its cost-to-go is infinite; pass a "
            "stabilizing gain (see stabilizing_gain)."
        )
    p = solve_discrete_lyapunov(np.sqrt(sys.gamma) * closed.T, sys.Q + gain.T @ sys.R @ gain)
    return _h_from_p(sys, 0.5 * (p + p.T))


def spectral_radius(m: np.ndarray) -> float:
    """Largest eigenvalue modulus of a square matrix."""
    return float(np.max(np.abs(np.linalg.eigvals(np.asarray(m)))))


def stabilizing_gain(sys: LQRSystem, *, r_scale: float = 100.0) -> np.ndarray:
    """A deliberately sub-optimal stabilizing gain: the undiscounted LQR gain with ``R·r_scale``.

    The heavy control penalty makes it far from ``K*`` (a real policy-iteration start), while the
    undiscounted DARE guarantees ``ρ(A + B K) < 1`` (checked; raises otherwise).
    """
    from scipy.linalg import solve_discrete_are

    r = sys.R * r_scale
    p = solve_discrete_are(sys.A, sys.B, sys.Q, r)
    k = -np.linalg.solve(r + sys.B.T @ p @ sys.B, sys.B.T @ p @ sys.A)
    rho = spectral_radius(sys.A + sys.B @ k)
    if rho >= 1.0:
        raise RuntimeError(f"stabilizing_gain failed: rho(A+BK) = {rho} >= 1 for {sys.name}.")
    return k


def num_features(n_z: int) -> int:
    """Number of free parameters of a symmetric ``n_z x n_z`` matrix: ``n_z (n_z + 1) / 2``."""
    return n_z * (n_z + 1) // 2


def triu_to_sym(theta: jnp.ndarray, n_z: int) -> jnp.ndarray:
    """Symmetric ``H`` from its upper triangle (row-major ``np.triu_indices`` order)."""
    rows, cols = np.triu_indices(n_z)
    h = jnp.zeros((n_z, n_z), dtype=theta.dtype).at[rows, cols].set(theta)
    return h + jnp.triu(h, 1).T


def sym_to_triu(h: jnp.ndarray) -> jnp.ndarray:
    """Upper triangle (``np.triu_indices`` order) of a (symmetrized) square matrix."""
    h = 0.5 * (h + h.T)
    rows, cols = np.triu_indices(h.shape[0])
    return h[rows, cols]


def q_value(theta: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
    """Quadratic Q-function ``q(z) = zᵀ H z``, ``H = triu_to_sym(theta)``, ``z`` ``(b, n_z)``.

    Linear in ``theta`` (features ``z_i z_j``, doubled off the diagonal); returns shape ``(b,)``.
    """
    n_z = z.shape[-1]
    if theta.shape != (num_features(n_z),):
        raise ValueError(
            f"theta must have shape ({num_features(n_z)},) for z of width {n_z}, got {theta.shape}."
        )
    h = triu_to_sym(theta, n_z)
    return jnp.einsum("bi,ij,bj->b", z, h, z)


def gain_from_h(h: jnp.ndarray, n_x: int) -> jnp.ndarray:
    """Greedy gain of a quadratic Q-function: ``K = −H_uu⁻¹ H_ux`` (JAX, jit-able)."""
    return -jnp.linalg.solve(h[n_x:, n_x:], h[n_x:, :n_x])
