"""Solver benchmark: exact active set vs cvxpy+OSQP vs scipy SLSQP, plus n = 10^4 exact and 10^5 blocks.

    python benchmarks/solver.py          # a few minutes; writes benchmarks/results/solver.txt

Needs the bench extra (cvxpy, osqp, scipy). BLAS threads: BENCH_THREADS (default 1, see below).
Every residual is the same relative KKT certificate (taskpgm_ray.mixture.simplex.kkt_residual), computed
for the other solvers after projecting their answer onto the simplex.
"""

import os

# One BLAS thread by default: on a shared 2-core machine, multi-threaded OpenBLAS under contention is
# 10-50x slower on the many small solves (seen: n = 10^5 blocks 218 s with 2 threads at load 15, 5 s with 1).
# BENCH_THREADS=2 measures the quiet-machine 2-core setting.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, os.environ.get("BENCH_THREADS", "1"))

import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from taskpgm_ray.mixture import BlockLowRank, energy_matrix, minimize_energy, pmi_affinity  # noqa: E402
from taskpgm_ray.mixture.simplex import kkt_residual, project_capped_simplex  # noqa: E402

BETA, LAM = 1.0, 1.0
OUT = io.StringIO()


def say(line=""):
    print(line)
    OUT.write(line + "\n")
    sys.stdout.flush()


def planted_loglik(n, rng, n_clusters):
    """L[i, j]: proxy i on task j; tasks in planted clusters, near-interchangeable within a cluster."""
    c = rng.integers(0, n_clusters, n)
    own = -rng.uniform(1.0, 3.0, n)
    gap = np.where(c[:, None] == c[None, :], rng.uniform(0.02, 0.1, (n, n)), rng.uniform(0.5, 2.0, (n, n)))
    L = own[None, :] - gap
    np.fill_diagonal(L, own)
    return L


def pmi_kernel(n, rng):
    return energy_matrix(pmi_affinity(planted_loglik(n, rng, max(2, int(np.sqrt(n))))), "psd", eps=1e-6)


def pmi_kernel_large(n, rng):
    """Same kernel for n where a full eigendecomposition is slow: lambda_min by Lanczos, then verified."""
    S = pmi_affinity(planted_loglik(n, rng, int(np.sqrt(n))))
    from taskpgm_ray.mixture.solvers import _lanczos_min

    shift = -_lanczos_min(S, steps=60)
    S[np.diag_indices(n)] += shift * (1 + 1e-6) + 1e-6
    return S


def random_psd(n, rng):
    A = rng.standard_normal((n, n // 2))
    return A @ A.T / (n // 2) + 1e-6 * np.eye(n)


def residual(S, p):
    p = project_capped_simplex(p, np.zeros(p.size), np.full(p.size, np.inf))
    u = S.sum(1)
    scale = LAM * np.abs(S).max() + BETA * np.abs(u).max()
    return kkt_residual(p, LAM * S @ p - BETA * u, np.zeros(p.size), np.full(p.size, np.inf), scale), p


def energy(S, p):
    return 0.5 * LAM * p @ S @ p - BETA * S.sum(1) @ p


def timed(fn, repeat=1):
    best, out = np.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_exact(S):
    return timed(lambda: minimize_energy(S, beta=BETA, lam=LAM), repeat=3)


def run_osqp(S):
    import cvxpy as cp

    n = S.shape[0]
    u = S.sum(1)

    def solve():
        p = cp.Variable(n)
        obj = 0.5 * LAM * cp.quad_form(p, cp.psd_wrap(S)) - BETA * u @ p
        prob = cp.Problem(cp.Minimize(obj), [p >= 0, cp.sum(p) == 1])
        prob.solve(solver=cp.OSQP)
        return p.value, prob.solver_stats.solve_time

    return timed(solve)


def run_slsqp(S):
    from scipy.optimize import minimize

    n = S.shape[0]
    u = S.sum(1)

    def solve():
        r = minimize(
            lambda p: energy(S, p),
            np.full(n, 1 / n),
            jac=lambda p: LAM * S @ p - BETA * u,
            method="SLSQP",
            bounds=[(0, None)] * n,
            constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1}],
            options={"ftol": 1e-12, "maxiter": 2000},
        )
        return r.x

    return timed(solve)


def main():
    rng = np.random.default_rng(0)
    say(
        f"# TaskPGM solver benchmark (numpy {np.__version__}, "
        f"BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}, load average {os.getloadavg()[0]:.1f})"
    )
    say(f"# E(p) = (lam/2) p^T S p - beta u^T p on the simplex, u = row sums, beta = {BETA}, lam = {LAM}")
    say("# residual = || p - proj(p - grad/scale) ||_inf (relative KKT certificate); time = wall seconds")
    say()
    say(
        f"{'problem':<7} {'n':>5} {'supp':>5} | {'exact s':>8} {'resid':>8} | {'cvxpy+osqp s':>12} "
        f"{'(osqp)':>7} {'resid':>8} {'ratio':>6} | {'slsqp s':>8} {'resid':>8} {'ratio':>6} | {'cf loss':>7}"
    )
    for kind, make in (("random", random_psd), ("pmi", pmi_kernel)):
        for n in (100, 300, 1000):
            S = make(n, rng)
            t_ex, sol = run_exact(S)
            t_os, (p_os, t_osqp_only) = run_osqp(S)
            r_os, _ = residual(S, p_os)
            if n <= 300:
                t_sl, p_sl = run_slsqp(S)
                r_sl, _ = residual(S, p_sl)
                sl = f"{t_sl:8.3f} {r_sl:8.1e} {t_sl / t_ex:5.0f}x"
            else:
                sl = f"{'skipped (n > 300)':>24}"
            cf = minimize_energy(S, beta=BETA, lam=LAM, method="closed_form")
            loss = (cf.energy - sol.energy) / abs(sol.energy)
            say(
                f"{kind:<7} {n:>5} {(sol.weights > 0).sum():>5} | {t_ex:8.4f} {sol.kkt_residual:8.1e} | "
                f"{t_os:12.3f} {t_osqp_only:7.3f} {r_os:8.1e} {t_os / t_ex:5.0f}x | {sl} | {100 * loss:6.1f}%"
            )
    say()
    say("# closed_form (the paper's: equality-constrained KKT, then projection) vs exact, PMI kernels:")
    say("#   relative energy loss (E_cf - E_exact) / |E_exact| over 5 seeds per n")
    for n in (30, 100, 300):
        losses = []
        for s in range(5):
            S = pmi_kernel(n, np.random.default_rng(100 + s))
            e = minimize_energy(S, beta=BETA, lam=LAM).energy
            losses.append((minimize_energy(S, beta=BETA, lam=LAM, method="closed_form").energy - e) / abs(e))
        say(
            f"#   n={n:<4} mean {100 * np.mean(losses):6.1f}%   min {100 * np.min(losses):6.1f}%   "
            f"max {100 * np.max(losses):6.1f}%"
        )
    say()
    n = 10_000
    big = pmi_kernel_large(n, np.random.default_rng(1))
    for beta in (1.0, 0.1):
        t, sol = timed(lambda beta=beta: minimize_energy(big, beta=beta, lam=LAM))
        say(
            f"exact   n={n}  pmi kernel, beta={beta}: {t:6.2f} s (solve {sol.extra['seconds']:.2f} s, "
            f"rest input checks), support {(sol.weights > 0).sum()}, residual {sol.kkt_residual:.1e}, "
            f"FW gap {sol.extra['gap']:.1e}"
        )
    A = np.random.default_rng(2).standard_normal((n, 200))
    big = A @ A.T / 200 + 1e-6 * np.eye(n)
    t, sol = timed(lambda: minimize_energy(big, beta=BETA, lam=LAM))
    say(
        f"exact   n={n}  random PSD (rank 200): {t:6.2f} s, support {(sol.weights > 0).sum()}, "
        f"residual {sol.kkt_residual:.1e}"
    )
    big = A = None  # free 1.6 GB before the n = 10^5 run
    say()
    n, size = 100_000, 100
    rng = np.random.default_rng(3)
    blocks = [pmi_kernel(size, rng) for _ in range(n // size)]
    V = 0.05 * rng.standard_normal((n, 4))
    op = BlockLowRank(blocks, V)
    t, sol = timed(lambda: minimize_energy(op, beta=BETA, lam=LAM, method="blocks", max_iter=300))
    gap = sol.extra["gap"]
    say(
        f"blocks  n={n} ({n // size} blocks of {size} + rank 4): {t:6.2f} s, energy {sol.energy:.6f}, "
        f"FW gap {gap:.2e} (relative {gap / abs(sol.energy):.1e}), "
        f"coarse-stage gap {sol.extra['gap_coarse']:.2e}, refine iterations {sol.iterations}"
    )
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "solver.txt"), "w") as f:
        f.write(OUT.getvalue())


if __name__ == "__main__":
    main()
