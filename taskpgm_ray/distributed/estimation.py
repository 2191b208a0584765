"""Stages 3-4: every proxy scores every task's probe set, on Ray actors, into the likelihood matrix.

The probe examples of all tasks are cut into shards (a contiguous block of one task's probe examples,
in a fixed order). ``EstimationActor``s hold the base model (the proxy model ``cfg.proxy``, with its own
tokenizer) and every adapter once, switch adapters with ``set_adapter``, and score a shard for any subset
of proxies: per example, the summed response log-likelihood, and per response token the top-k
next-token log-probabilities (for the JSD). A shard is scored in fixed batches of consecutive examples,
so its numbers do not depend on which actor ran it.

Cache: ``<output_dir>/estimate/shards/<key>.npz``, key = hash of the shard's examples and the scoring
settings. A file holds one row per proxy, keyed by the proxy's adapter hash, so a re-run scores only
the missing (proxy, shard) pairs: a new task's proxy on every shard, every proxy on the new task's
shards. For the JSD it also keeps each proxy's top-k arrays on the shard (int32 ids and float32
log-probabilities, T x k per proxy: about 8 k bytes per probe token per proxy), from which the pairs of
a new proxy with the cached ones are computed, plus the pairwise JSD sums for the proxies it has.

Besides the proxies, every shard is scored by the base model (key ``base``), and by the shard's own
proxy and the base with each prompt paired with the response r examples on, for r = 1 .. K - 1 (keys
``rot:<hash>``, ``rot2:<hash>``, ...; K = ``estimation.info_prompts``, at most the shard's size): the bounded
input-output information of ``taskpgm_ray.mixture.signal.info_nce``. These n + 1 + 2 (K - 1) scorings per
shard (instead of n) feed the signal checks and the energy's ``information`` unary.

The driver feeds every result to the central optimiser (``optimizer.MixtureOptimizer``, one actor),
which re-solves the mixture; with ``estimation.stop_when_stable`` the driver stops handing out shards
once the optimiser calls the mixture stable. Shards go out round-robin over tasks so that every column
has data early. An actor that dies has its shards re-queued; final sums are formed in shard order, so
they are bit-identical whatever ran where.

The jobs, one module each: ``scoring`` (shards, the actor, the keys), ``shard_cache``, ``actor_pool``, ``sums``,
``active_driver`` (``estimation.active``); this module is the entry (``estimate_command``), the full-scoring
driver and the outputs. The signal checks are ``mixture.signal.signal_checks`` (pure numpy).

Ray touch-points (here; the actors' are in ``actor_pool``):
  ``ray.remote(MixtureOptimizer)``         the central optimiser, one actor, re-solving as sums arrive
  ``ray.get`` / ``ray.wait``               the optimiser's answers (the live line never waits for one)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from taskpgm_ray.config import Config, active_estimation
from taskpgm_ray.console import StageProgress
from taskpgm_ray.distributed.active_driver import estimate_active
from taskpgm_ray.distributed.actor_pool import ActorPool
from taskpgm_ray.distributed.optimizer import MixtureOptimizer, ShardSums
from taskpgm_ray.distributed.scoring import EstimationError, Proxy, Shard, make_shards, scoring_settings, shard_keys
from taskpgm_ray.distributed.shard_cache import jsd_pairs, missing_keys, read_shard
from taskpgm_ray.distributed.sums import per_example, shard_sums, totals
from taskpgm_ray.io import atomic_savez, atomic_write_json
from taskpgm_ray.mixture.signal import signal_checks
from taskpgm_ray.tasks import TaskData

# --------------------------------------------------------------------------------------------------
# the driver


def resolve_proxies(cfg: Config, tasks: list[TaskData]) -> list[Proxy]:
    """The finished probe adapter of every task, in task order; an error names each one missing."""
    from taskpgm_ray.distributed.probes import is_complete, probe_dir

    proxies, missing = [], []
    for t in tasks:
        d = probe_dir(cfg, t).resolve()
        if not is_complete(d):
            missing.append(f"{t.name!r} (expected at {d})")
        proxies.append(Proxy(t.name, d.name.rsplit("-", 1)[1], str(d)))
    if missing:
        raise EstimationError(f"no finished probe adapter for task(s) {', '.join(missing)}; "
                              f"run `taskpgm probe CONFIG` (stage 2) or `taskpgm run CONFIG` (every stage) first")
    return proxies


def estimate_command(cfg: Config, *, tasks: list[TaskData] | None = None,
                     on_result: Callable[[int, list], None] | None = None,
                     progress: StageProgress | None = None) -> dict:
    """Score the proxies on the probe sets and write the likelihood matrix, affinities and mixture.

    Every proxy scores every probe shard, unless ``estimation.active``: then a first pass and the
    (proxy, shard) units ``mixture.active`` asks for, until the mixture is certain (``estimate_active``).

    Args:
        cfg: the run config (``estimation``, ``energy``, the proxy model, ``tracking``, ``output_dir``).
        tasks: already loaded tasks (default: ``load_tasks(cfg)``).
        on_result: test hook, called as ``on_result(results_so_far, actor_handles)`` after each newly
            scored shard (e.g. to kill an actor mid-run).
        progress: the stage's live line: shards k/n and the running mixture's L1 change.

    Writes (under ``output_dir``): ``likelihoods.npz`` (CONTRACT.md), ``jsd.npz`` (with ``estimation.jsd``),
    ``estimate/mixture.json`` (the config's energy), ``estimate/signal.json`` (signal checks),
    ``estimate/examples.npz`` (per-example scores), ``estimate/affinity.png``, ``estimate/progress.json``
    (with ``fraction_pairs`` and the ``measured`` matrix), ``estimate/shards/*.npz``,
    ``estimate/active.json`` (``estimation.active``: the stop rule's state, for a resume), and a W&B run.

    Returns:
        the ``progress.json`` content plus the ``weights`` and the paths written.

    Raises:
        EstimationError: a task without probe examples, a missing or unloadable adapter, a non-finite
            log-likelihood, or every actor lost.
        ValueError: the actors ask for more CPUs/GPUs than the cluster has.
    """
    from taskpgm_ray.distributed.cluster import init_ray, require_resources
    from taskpgm_ray.models import ensure_proxy_tokenizer
    from taskpgm_ray.tasks import load_tasks

    t0 = time.perf_counter()
    e = cfg.estimation
    tasks = load_tasks(cfg) if tasks is None else tasks
    names = [t.name for t in tasks]
    n = len(tasks)
    utilities = [t.utility for t in tasks]
    settings = scoring_settings(cfg)
    shards = make_shards(tasks, e.shard_size, settings)
    proxies = resolve_proxies(cfg, tasks)
    order = [p.hash for p in proxies]
    init_ray()
    require_resources(f"estimation ({e.num_actors} actors x {e.num_cpus_per_actor:g} CPU, "
                      f"{e.num_gpus_per_actor:g} GPU)", cpus=e.num_actors * e.num_cpus_per_actor,
                      gpus=e.num_actors * e.num_gpus_per_actor)
    out_dir = Path(cfg.output_dir)
    shard_dir = out_dir / "estimate" / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or StageProgress()
    stats = {"scored": 0, "adapter_shard_scorings": 0, "forwards": 0, "requeued": 0, "actor_failures": 0,
             "tokens_scored": 0, "scoring_seconds": 0.0}
    records = {s.index: read_shard(shard_dir / f"{s.key}.npz") for s in shards}  # the cache
    pool = ActorPool(cfg, proxies, records, stats, on_result=on_result,
                      tok_path=lambda: str(ensure_proxy_tokenizer(cfg, out_dir).resolve()))
    active = None
    try:
        if active_estimation(cfg, n):
            active = estimate_active(cfg, tasks, shards, order, records, pool, progress)
            used, trajectory, bands = [s.index for s in shards], active["trajectory"], active["bands"]
            sums = {s.index: shard_sums(s, records[s.index], order, False, e.info_prompts) for s in shards}
            cached = active["cached"]
        else:
            used, cached, sums, trajectory, bands = _estimate_full(cfg, tasks, shards, order, records, pool,
                                                                   progress, utilities)
    finally:
        pool.close()

    # final sums in shard order (bit-identical whatever ran where), outputs
    loglik_sum, count, jsd_sum, jsd_tokens, signal_sums = totals([sums[i] for i in sorted(used)], n)
    probe_total = np.array([len(t.probe) for t in tasks])  # (n,) probe examples per task
    measured = np.broadcast_to(count / probe_total, (n, n)).copy()  # every proxy scored the shards used
    if active is not None:  # the solver sees the completed matrix; measured cells keep their exact sums
        loglik_sum, count, measured = active["loglik_sum"], active["count"], active["measured"]
    examples = per_example(shards, sorted(used), records, order, e.info_prompts)
    atomic_savez(out_dir / "estimate" / "examples.npz", tasks=np.array(names), **examples)
    signal = signal_checks(names, examples, n_boot=max(e.bootstrap, 100), seed=cfg.probes.seed)
    atomic_write_json(out_dir / "estimate" / "signal.json", signal)
    units_total = n * len(shards)
    units_scored = sum(sum(h in records[i]["loglik"] for h in order) for i in used)
    progress = {
        "tasks": names, "shards_total": len(shards), "shards_used": len(used), "shards_cached": len(cached),
        "fraction_used": len(used) / len(shards) if active is None else units_scored / units_total,
        "examples_used": int(count.sum()), "examples_total": int(sum(len(t.probe) for t in tasks)),
        "stopped_early": len(used) < len(shards) or units_scored < units_total, **stats, "trajectory": trajectory,
        "bootstrap": _named_bands(bands, names),
        # Which entries of the likelihood matrix were measured: measured[i][j] = share of task j's probe
        # examples that proxy i scored (1: exact; 0: filled in by the completion of mixture/completion.py).
        "active": active is not None, "fraction_pairs": float(np.mean(measured > 0)),
        "fraction_units": units_scored / units_total,
        "fraction_examples": float((measured * probe_total[None, :]).sum() / (n * probe_total.sum())),
        "measured": measured.tolist(),
        "certainty": active["certainty"] if active is not None else None,
    }
    result = _write_outputs(cfg, tasks, loglik_sum, count, jsd_sum if e.jsd and active is None else None,
                            jsd_tokens if e.jsd and active is None else None, progress, signal_sums, measured)
    progress["seconds"] = time.perf_counter() - t0
    atomic_write_json(out_dir / "estimate" / "progress.json", progress)
    _log_wandb(cfg, progress, result, signal)
    return {**progress, **result, "signal": signal}


def _estimate_full(cfg, tasks, shards, order, records, pool, progress, utilities):
    """Every proxy on every shard, fed to the central optimiser; with ``stop_when_stable``, until it is stable.

    Returns ``(used shard indices, cached shards, {index: ShardSums}, trajectory, bootstrap bands)``.
    """
    import ray

    from taskpgm_ray.distributed.solve import mixture_caps

    e = cfg.estimation
    # 1. the cache: what is already scored, and which (proxy, shard) pairs are missing
    todo = deque((s, missing_keys(records[s.index], shard_keys(s, order, e.info_prompts), order, e.jsd)) for s in shards
                 if missing_keys(records[s.index], shard_keys(s, order, e.info_prompts), order, e.jsd)
                 or (e.jsd and jsd_pairs(records[s.index], order) is None))
    pending = {s.index for s, _ in todo}
    cached = [s for s in shards if s.index not in pending]
    progress.start(len(shards), done=len(cached))

    # 2. the central optimiser, fed the cached shards first (in round-robin order)
    optimizer = ray.remote(MixtureOptimizer).options(num_cpus=0).remote(
        len(tasks), len(shards), cfg.energy, e.stop_when_stable, utilities, mixture_caps(cfg, tasks),
        [len(t.train) for t in tasks])
    sums: dict[int, ShardSums] = {}
    status: dict = {"stable": False}
    last_update = None  # the optimizer's answer to the previous shard, read for the live line when ready
    try:
        for s in cached:
            sums[s.index] = shard_sums(s, records[s.index], order, e.jsd, e.info_prompts)
            status = ray.get(optimizer.add.remote(sums[s.index]))
            if status["stable"]:
                break

        def after(s: Shard, keys: list[str]) -> None:
            nonlocal last_update
            sums[s.index] = shard_sums(s, records[s.index], order, e.jsd, e.info_prompts)
            update = optimizer.add.remote(sums[s.index])
            if e.stop_when_stable is not None:  # only the stopping rule needs the answer before going on
                status.update(ray.get(update))
            elif last_update is not None and ray.wait([last_update], timeout=0)[0]:  # the display: never wait
                status["l1_change"] = ray.get(last_update)["l1_change"]
            last_update = update
            l1 = status.get("l1_change")
            progress.update(len(sums), info=f"mixture L1 change {l1:.2g}" if l1 is not None else "")

        # 3. the actors score what is missing, until done or the mixture is stable
        if todo and not status["stable"]:
            pool.score(todo, after=after, stop=lambda: status["stable"])
        trajectory = ray.get(optimizer.trajectory.remote())
        bands = ray.get(optimizer.bootstrap.remote(e.bootstrap, cfg.probes.seed))
    finally:
        ray.kill(optimizer)
    return sorted(sums), cached, sums, trajectory, bands


# Active estimation (estimation.active): the first pass and the rounds, as in benchmarks/active.py.
def _named_bands(bands: dict | None, names: list[str]) -> dict | None:
    if bands is None:
        return None
    return {k: (dict(zip(names, v)) if isinstance(v, list) else v) for k, v in bands.items()}


def inputs_hash(names: list[str], loglik_sum: np.ndarray, count: np.ndarray, jsd_sum=None, tokens=None) -> str:
    """Hash of the likelihood inputs a mixture was solved from (``mixture.json``'s ``inputs_hash``)."""
    h = hashlib.sha256(json.dumps(names).encode())
    for a in (loglik_sum, count, jsd_sum, tokens):
        if a is not None:
            h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
    return h.hexdigest()[:16]


def _write_outputs(cfg, tasks, loglik_sum, count, jsd_sum, tok_by_task, progress, signal_sums, measured) -> dict:
    """likelihoods.npz (with ``measured``), jsd.npz (the JSD sums per proxy pair), the heatmap and the
    default-hyperparameter mixture.json."""
    from taskpgm_ray.distributed.solve import affinity_from_sums, mixture_caps, solve_from_sums
    from taskpgm_ray.figures import plot_affinity
    from taskpgm_ray.mixture_file import save_likelihoods, write_mixture

    out = Path(cfg.output_dir)
    names = [t.name for t in tasks]
    sizes = np.array([len(t.train) for t in tasks], dtype=np.int64)
    save_likelihoods(str(out / "likelihoods.npz"), names, loglik_sum, count, sizes, measured=measured,
                     **signal_sums)
    tokens = None
    written = {"likelihoods": str(out / "likelihoods.npz")}
    if jsd_sum is not None:
        tokens = int(tok_by_task.sum())
        atomic_savez(out / "jsd.npz", tasks=np.array(names), jsd_sum=jsd_sum, token_count=np.int64(tokens),
                     token_count_per_task=tok_by_task)
        written["jsd"] = str(out / "jsd.npz")
    e = cfg.energy
    weights, sol, _ = solve_from_sums(
        loglik_sum, count, jsd_sum, tokens, e, utilities=[t.utility for t in tasks],
        signal=signal_sums, max_weights=mixture_caps(cfg, tasks), sizes=sizes)
    affinity = affinity_from_sums(loglik_sum, count, jsd_sum, tokens, e.affinity)
    (out / "estimate").mkdir(parents=True, exist_ok=True)
    written["heatmap"] = str(plot_affinity(names, affinity, out / "estimate" / "affinity.png",
                                           f"{e.affinity} affinity (clustered order)"))
    hyper = {**{k: v for k, v in asdict(e).items() if k != "affinity"}, "fraction_used": progress["fraction_used"]}
    digest = inputs_hash(names, loglik_sum, count, jsd_sum if e.affinity == "jsd" else None,
                         tokens if e.affinity == "jsd" else None)
    named = dict(zip(names, map(float, weights)))
    write_mixture(out / "estimate" / "mixture.json", weights=named, method="taskpgm", affinity=e.affinity,
                  hyperparameters=hyper, energy=float(sol.energy), kkt_residual=float(sol.kkt_residual),
                  sizes=dict(zip(names, map(int, sizes))), inputs_hash=digest, weight_unit=cfg.train.weight_unit)
    written["mixture"] = str(out / "estimate" / "mixture.json")
    return {"weights": named, "energy": float(sol.energy), "kkt_residual": float(sol.kkt_residual),
            "inputs_hash": digest, "affinity": affinity.tolist(), "paths": written}


def _log_wandb(cfg: Config, progress: dict, result: dict, signal: dict) -> None:
    """Progress curve, heatmap, mixture and signal checks to W&B (offline unless configured online)."""
    from taskpgm_ray.tracking import wandb_run

    names = progress["tasks"]
    with wandb_run(cfg.tracking, cfg.output_dir, job_type="estimate",
                   config={"estimation": asdict(cfg.estimation), "energy": asdict(cfg.energy)}) as run:
        if run is None:
            return
        import wandb

        for row in progress["trajectory"]:  # active estimation: one row per check, with its declared L1
            run.log({"estimate/fraction": row["fraction"], "estimate/l1_change": row["l1_change"],
                     **{f"estimate/{k}": row[k] for k in ("fraction_pairs", "declared_l1") if k in row},
                     **{f"estimate/weight/{k}": v for k, v in zip(names, row["weights"])}}, step=row["shards"])
        # which entries of the likelihood matrix were measured (share of the cell's probe examples scored)
        run.log({"estimate/measured": wandb.Table(
            columns=["proxy", "task", "measured"],
            data=[[names[i], names[j], v] for i, row in enumerate(progress["measured"]) for j, v in enumerate(row)])})
        run.log({"estimate/affinity": wandb.Image(result["paths"]["heatmap"])})
        columns = ["gain", "gain_low", "gain_high", "learned", "information", "information_bound", "output_only"]
        rows = [[k, *(v[c] for c in columns)] for k, v in signal["tasks"].items()]
        run.log({"estimate/signal": wandb.Table(columns=["task", *columns], data=rows)})
        certainty = progress["certainty"] or {}
        run.summary.update({"fraction_used": progress["fraction_used"], "energy": result["energy"],
                            "active": progress["active"], "fraction_pairs": progress["fraction_pairs"],
                            "fraction_examples": progress["fraction_examples"],
                            **({"declared_l1": certainty["declared_l1"]} if certainty else {}),
                            "signal/learned": signal["learned"], "signal/warnings": len(signal["warnings"]),
                            **({"signal/affinity_snr": signal["affinity"]["snr"]} if "affinity" in signal else {}),
                            **{f"weight/{k}": v for k, v in result["weights"].items()}})
