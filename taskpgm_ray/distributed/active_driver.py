"""Active estimation's driver: a first pass, then rounds of the (proxy, shard) units ``mixture.active`` asks for,
until the mixture is certain within ``estimation.active_tol`` (the maths is in ``taskpgm_ray.mixture.active``).

Ray touch-points: none directly (scoring goes through ``actor_pool.ActorPool``).
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from taskpgm_ray.config import Config
from taskpgm_ray.distributed.scoring import Shard, shard_keys
from taskpgm_ray.distributed.sums import example_noise, shard_sums, totals
from taskpgm_ray.io import atomic_savez, atomic_write_json
from taskpgm_ray.tasks import TaskData

ACTIVE_FIRST_FRACTION = 0.05  # first pass: share of the other off-diagonal pairs scored on one shard
ACTIVE_FULL_PER_TASK = 2  # first pass: other proxies per task scored on every shard
ACTIVE_ROUND = 0.01  # share of all (proxy, shard) units asked for per round (at least 2 per actor)
ACTIVE_CHECKS = 2  # certain checks in a row before stopping (one can be certain by chance)
ACTIVE_LEVEL = 0.9  # probability of the declared L1 bound
ACTIVE_DRAWS = 64  # bootstrap draws per check


def estimate_active(cfg, tasks, shards, order, records, pool, progress) -> dict:
    """Active estimation: score the first pass, then rounds of the units ``next_pairs`` asks for, until
    ``mixture_certainty`` is certain within ``estimation.active_tol`` at two checks in a row.

    A unit is (proxy i, shard r of task j); the base model and the rotated pairs score every shard (the
    signal checks and the information unary need them; 1 + 2 (K - 1) scorings per shard against n proxies). Units are
    cached per (adapter, shard) as in a full run, so an interrupted run resumes with what it had; the stop
    rule's streak is kept in ``estimate/active.json`` under a hash of the scored units and of everything the
    rule's solve reads (the energy, the caps, the utilities and sizes), so a re-run of a finished estimation
    scores nothing, and a re-run with another energy starts a new streak. The last check's inputs go to
    ``estimate/active.npz``, from which ``active_certainty`` redoes the check for another energy.

    Returns ``loglik_sum`` (n, n: the completed matrix times ``count``, exact sums in fully measured cells),
    ``count`` (n: every probe example), ``measured`` (n, n: share of each cell's examples scored),
    ``trajectory`` (one row per check), ``bands``, ``certainty`` (the last check) and ``cached`` (shards with
    every planned unit already on disk at the start).
    """
    from taskpgm_ray.distributed.solve import mixture_caps
    from taskpgm_ray.mixture.active import complete_likelihoods, initial_pairs, mixture_certainty, next_pairs

    e, n, seed = cfg.estimation, len(tasks), cfg.probes.seed
    by_task = [[s for s in shards if s.task == j] for j in range(n)]  # shard r of task j: by_task[j][r]
    count = np.zeros((n, max(len(b) for b in by_task)))  # (n, n_shards) examples per shard
    for j, b in enumerate(by_task):
        count[j, : len(b)] = [len(s.example_ids) for s in b]
    N = count.sum(1)
    units_total = int(n * (count > 0).sum())
    state_path = Path(cfg.output_dir) / "estimate" / "active.json"
    saved = read_json(state_path)
    sizes = [len(t.train) for t in tasks]
    utilities, caps = [t.utility for t in tasks], mixture_caps(cfg, tasks)
    plan = initial_pairs(count, fraction=ACTIVE_FIRST_FRACTION, full_per_task=min(ACTIVE_FULL_PER_TASK, n - 1),
                         seed=seed)
    budget = max(2 * e.num_actors, int(np.ceil(ACTIVE_ROUND * units_total)))

    def scored_units() -> tuple[np.ndarray, np.ndarray]:
        """(n, n, n_shards) the units on disk and their summed log-likelihoods (0 where not scored)."""
        mask, Y = np.zeros((n, *count.shape), bool), np.zeros((n, *count.shape))
        for j, b in enumerate(by_task):
            for r, s in enumerate(b):
                ll = (records[s.index] or {"loglik": {}})["loglik"]
                for i, h in enumerate(order):
                    if h in ll:
                        mask[i, j, r], Y[i, j, r] = True, float(np.sum(ll[h]))
        return mask, Y

    def wanted(plan: np.ndarray) -> deque:
        """(shard, keys still missing) for every shard the plan touches, the base and rotations included."""
        todo = deque()
        for j, b in enumerate(by_task):
            for r, s in enumerate(b):
                keys = [order[i] for i in np.flatnonzero(plan[:, j, r])] + shard_keys(s, order, e.info_prompts)[n:]
                have = (records[s.index] or {"loglik": {}})["loglik"]
                need = [k for k in keys if k not in have]
                if need:
                    todo.append((s, need))
        return todo

    todo = wanted(plan)
    cached = [s for s in shards if s.index not in {t.index for t, _ in todo}]
    done = int(scored_units()[0].sum())  # units on disk, for the live line
    progress.start(units_total, done=done)
    streak, trajectory, last = 0, [], None

    def after(s: Shard, keys: list[str]) -> None:
        nonlocal done
        done += sum(k in set(order) for k in keys)
        progress.update(done)

    while True:
        if todo:
            pool.score(todo, after=after)
        scored, Y = scored_units()
        # the energy's inputs besides L: the signal sums from the base and rotated scorings of every shard
        _, _, _, _, sig = totals([shard_sums(s, records[s.index], order, False, e.info_prompts) for s in shards], n)

        solve = _active_solver(cfg.energy, N, sig, utilities, caps, sizes)
        noise_var = example_noise(by_task, records, order)
        comp = complete_likelihoods(Y, count, scored, seed=seed, noise_var=noise_var)
        cert = mixture_certainty(comp, solve, tol=e.active_tol, level=ACTIVE_LEVEL, n_boot=ACTIVE_DRAWS, seed=seed)
        # The streak is the rule's verdict on this energy's mixture: another energy (or caps, utilities, sizes)
        # is another mixture and starts its own streak.
        solve_inputs = [asdict(cfg.energy), None if caps is None else np.asarray(caps).tolist(), utilities, sizes]
        key = hashlib.sha256(json.dumps([order, [s.key for s in shards], e.active_tol, seed, solve_inputs]).encode()
                             + np.packbits(scored).tobytes()).hexdigest()[:24]
        if saved and saved.get("key") == key:  # the very check a previous run ended on: not a new check
            streak, trajectory = int(saved["streak"]), list(saved["trajectory"])
        else:
            streak = streak + 1 if cert.certain else 0
            trajectory.append({"shards": int(scored.sum()), "fraction": float(scored.sum() / units_total),
                               "fraction_pairs": comp.fraction_pairs, "fraction_examples": comp.fraction_examples,
                               "l1_change": float(np.abs(cert.weights - last).sum()) if last is not None else None,
                               "declared_l1": cert.l1_at_level, "expected_l1": cert.expected_l1,
                               "certain": cert.certain, "rank": comp.rank, "weights": cert.weights.tolist()})
        last = cert.weights
        atomic_write_json(state_path, {"key": key, "streak": streak, "trajectory": trajectory})
        progress.update(int(scored.sum()), info=f"pairs {comp.fraction_pairs:.0%}, within "
                                                f"{cert.l1_at_level:.2g} L1 (90%)")
        if streak >= ACTIVE_CHECKS or scored.sum() >= units_total:
            break
        pick = next_pairs(comp, cert, budget)
        plan = scored.copy()
        plan[pick[:, 0], pick[:, 1], pick[:, 2]] = True
        todo = wanted(plan)

    # The last check's inputs: the completion is a deterministic function of them, so the check can be redone
    # for another energy (``active_certainty``: the report's bound for the mixture the run selected).
    atomic_savez(state_path.with_suffix(".npz"), loglik_units=Y, count=count, scored=scored, noise_var=noise_var,
                 seed=np.int64(seed))
    measured = comp.scored_examples / N[None, :]
    full = comp.scored_examples >= N[None, :]
    loglik_sum = np.where(full, Y.sum(2), comp.loglik_mean * N[None, :])
    return {"loglik_sum": loglik_sum, "count": N.astype(np.int64), "measured": measured, "trajectory": trajectory,
            "cached": cached,
            "bands": {"resamples": ACTIVE_DRAWS, "level": ACTIVE_LEVEL, "unit": "completed likelihood matrix",
                      "mean": cert.samples.mean(0).tolist(), "std": cert.samples.std(0).tolist(),
                      "low": cert.low.tolist(), "high": cert.high.tolist()},
            "certainty": {"tol": e.active_tol, "level": ACTIVE_LEVEL, "draws": ACTIVE_DRAWS,
                          "declared_l1": cert.l1_at_level, "expected_l1": cert.expected_l1,
                          "certain": cert.certain, "checks_certain_in_a_row": streak,
                          "stopped_by": "certainty" if streak >= ACTIVE_CHECKS else "everything scored",
                          "completion_rank": comp.rank, "completion_tau2": comp.tau2,
                          "energy": asdict(cfg.energy)}}  # the bound is for this energy's mixture


def _active_solver(energy, N, signal, utilities, caps, sizes) -> Callable[[np.ndarray], np.ndarray]:
    """The solve the certainty rule bootstraps: a complete (n, n) mean log-likelihood matrix to ``energy``'s
    mixture, with the estimate's signal sums, the repetition caps and the tasks' utilities and sizes."""
    from taskpgm_ray.distributed.solve import solve_from_sums

    def solve(L: np.ndarray) -> np.ndarray:
        return solve_from_sums(L * N[None, :], N, None, None, energy, utilities=utilities, signal=signal,
                               max_weights=caps, sizes=sizes)[0]

    return solve


def active_certainty(cfg: Config, tasks: list[TaskData], energy) -> dict | None:
    """The active stop rule's last check redone for ``energy`` (an ``EnergyConfig``): the bound on how far the
    full-scoring mixture of that energy is from the one the completed likelihood matrix gives.

    The estimate stage's bound (``progress.json`` ``certainty``) is for the config's energy; Tune may select a
    trial with another beta, prior strength or kernel, and that mixture's bound is not the same. The check reads
    ``estimate/active.npz`` (the scored units and the per-example noise of the last check) and the signal sums
    of ``likelihoods.npz``; the completion and the draws use the estimate's seed, so for the config's energy it
    is the stage's own last check, to the digit.

    Returns:
        ``{"tol", "level", "draws", "declared_l1", "expected_l1", "certain", "weights", "energy"}``, or None when
        the run has no active estimation state (a full scoring, or a run from before the file existed).
    """
    from taskpgm_ray.distributed.solve import mixture_caps
    from taskpgm_ray.mixture.active import complete_likelihoods, mixture_certainty
    from taskpgm_ray.mixture_file import load_signal

    out = Path(cfg.output_dir)
    path = out / "estimate" / "active.npz"
    if not path.exists() or not (out / "likelihoods.npz").exists():
        return None
    with np.load(path) as f:
        Y, count, scored, noise_var, seed = (f["loglik_units"], f["count"], f["scored"], f["noise_var"],
                                             int(f["seed"]))
    if scored.shape[0] != len(tasks):
        return None  # the state of another task list
    N = count.sum(1)
    solve = _active_solver(energy, N, load_signal(str(out / "likelihoods.npz")), [t.utility for t in tasks],
                           mixture_caps(cfg, tasks), [len(t.train) for t in tasks])
    comp = complete_likelihoods(Y, count, scored, seed=seed, noise_var=noise_var)
    tol = cfg.estimation.active_tol
    cert = mixture_certainty(comp, solve, tol=tol, level=ACTIVE_LEVEL, n_boot=ACTIVE_DRAWS, seed=seed)
    return {"tol": tol, "level": ACTIVE_LEVEL, "draws": ACTIVE_DRAWS, "declared_l1": cert.l1_at_level,
            "expected_l1": cert.expected_l1, "certain": cert.certain, "weights": cert.weights.tolist(),
            "energy": asdict(energy)}


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or unreadable (then the state starts afresh)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
