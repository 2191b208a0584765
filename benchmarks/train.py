"""Benchmark: does the mixture sampler cost training throughput? And how fast does it draw on its own?

    python benchmarks/train.py [--steps 100] [--repeats 2] [--workers 2] | tee benchmarks/results/train.txt

Same Ray Train + DeepSpeed setup as ``taskpgm train --test-mode`` (tiny model, synthetic suite, 2 CPU workers).
Both fine-tunes see the same data distribution: the mixture sampler with size-proportional weights versus the
pooled-epoch sampler below (one shuffled epoch over all examples pooled, no per-task bookkeeping), so the tokens/s
ratio isolates the sampler's own cost. The pooled sampler is the benchmark's alone: it reaches the workers as a
recipe subclass, the product loop has no branch for it. Each sampler runs ``--repeats`` times, alternating; the
best run of each counts (noise on a shared machine only ever slows a run down).
Targets: ratio >= 0.99, sampler >= 10^6 draws/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402


def sampler_draws_per_second(n_tasks: int, call_size: int, seconds: float = 2.0) -> float:
    """Draws per second of ``MixtureSampler.draw(call_size)`` over ``n_tasks`` tasks of 100-5,000 examples."""
    from taskpgm_ray.train.sampler import MixtureSampler

    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(n_tasks))
    s = MixtureSampler([f"t{i}" for i in range(n_tasks)], rng.integers(100, 5000, n_tasks), weights, seed=0)
    s.draw(call_size)  # warm the caches
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(s.draw(call_size)[0])
    return n / (time.perf_counter() - t0)


def pooled_epoch_recipe() -> type:
    """``MixtureFinetune`` with a :class:`PooledEpochSampler` (built here, so Ray pickles it by value)."""
    from taskpgm_ray.train.recipe import MixtureFinetune
    from taskpgm_ray.train.sampler import MixtureSampler

    class PooledEpochSampler(MixtureSampler):
        """Every training example of every task equally likely: shuffled epochs over all examples pooled
        (tasks in proportion to their size). Same interface and global-stream semantics as MixtureSampler."""

        def __init__(self, names: list[str], sizes: list[int], *, seed: int):
            sizes = np.asarray(sizes, dtype=np.int64)
            super().__init__(names, sizes, sizes / max(1, sizes.sum()), seed=seed)
            self._offsets = np.concatenate([[0], np.cumsum(sizes)])  # first pooled index of each task
            self._pool_epoch = -1                                    # epoch of the cached permutation
            self._pool_perm = np.zeros(0, dtype=np.int64)            # that epoch's order of pooled indices

        def draw(self, n: int) -> tuple[np.ndarray, np.ndarray]:
            total = int(self._offsets[-1])
            out = np.empty(n, dtype=np.int64)
            filled = 0
            while filled < n:
                epoch, pos = divmod(self._draws, total)
                if epoch != self._pool_epoch:
                    self._pool_perm = np.random.default_rng([self.seed, epoch, 0xA11]).permutation(total)
                    self._pool_epoch = epoch
                m = min(n - filled, total - pos)
                out[filled: filled + m] = self._pool_perm[pos: pos + m]
                filled += m
                self._draws += m
            tasks = np.searchsorted(self._offsets, out, side="right") - 1
            self._drawn += np.bincount(tasks, minlength=len(self.names))
            return tasks, out - self._offsets[tasks]

    class PooledEpochFinetune(MixtureFinetune):
        def _setup_sampler(self) -> None:
            super()._setup_sampler()
            self.sampler = PooledEpochSampler(self.task_names, [len(e) for e in self.train_encoded],
                                              seed=self.tc.seed)

    return PooledEpochFinetune


def fine_tune_throughput(sampler: str, steps: int, workers: int, root: str, tag: str) -> dict:
    from taskpgm_ray.config import TrackingConfig, load_config
    from taskpgm_ray.tasks import load_tasks
    from taskpgm_ray.train import build_trainer

    cfg = load_config(test_mode=True, overrides={
        "output_dir": os.path.join(root, "shared"), "train.steps": steps, "train.num_workers": workers,
        "train.eval_every": 0, "train.checkpoint_every": 0})
    cfg.tracking = TrackingConfig(wandb="disabled")
    tasks = load_tasks(cfg)
    sizes = np.array([len(t.train) for t in tasks], dtype=float)
    weights = {t.name: float(n / sizes.sum()) for t, n in zip(tasks, sizes)}  # the unweighted distribution
    trainer = build_trainer(cfg, tasks, weights, run_dir=os.path.join(root, tag), name="bench",
                            recipe=pooled_epoch_recipe() if sampler == "uniform" else None)
    summary = trainer.fit().return_value
    return summary["throughput"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import deepspeed
    import ray
    import torch

    from taskpgm_ray.distributed.cluster import init_ray

    print("# benchmarks/train.py: mixture sampler vs unweighted sampler, Ray Train + DeepSpeed ZeRO-2 on CPU")
    print(f"# ray {ray.__version__}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"# tiny model, synthetic suite (test mode), {args.workers} workers x 8 examples/step, {args.steps} steps")
    print()
    print("## the sampler alone")
    per_step = args.workers * 8  # one training step's global draws (test mode: 8 examples per worker)
    rates = {}
    for n_tasks, call in ((6, 1 << 16), (1000, 1 << 16), (6, per_step)):
        rates[n_tasks, call] = sampler_draws_per_second(n_tasks, call)
        print(f"MixtureSampler.draw({call:>5}) over {n_tasks:>4} tasks: {rates[n_tasks, call]:>12,.0f} draws/s")
    print()

    init_ray(num_cpus=max(2, args.workers))
    results: dict[str, list[dict]] = {"mixture": [], "uniform": []}
    with tempfile.TemporaryDirectory(prefix="taskpgm-bench-") as root:
        order = ["mixture", "uniform", "uniform", "mixture"] * args.repeats
        for i, sampler in enumerate(order[: 2 * args.repeats]):
            tp = fine_tune_throughput(sampler, args.steps, args.workers, root, f"{sampler}-{i}")
            results[sampler].append(tp)
            print(f"run {i + 1}: {sampler:<8} {tp['tokens_per_s']:>10,.0f} tokens/s  "
                  f"{tp['examples_per_s']:>8,.1f} examples/s  ({tp['train_seconds']:.1f} s of training)", flush=True)
    ray.shutdown()

    best = {k: max(v, key=lambda tp: tp["tokens_per_s"]) for k, v in results.items()}
    ratio = best["mixture"]["tokens_per_s"] / best["uniform"]["tokens_per_s"]
    print()
    print("## fine-tune throughput (best of each)")
    print(f"{'sampler':<10} {'tokens/s':>12} {'examples/s':>12}")
    for k in ("mixture", "uniform"):
        print(f"{k:<10} {best[k]['tokens_per_s']:>12,.0f} {best[k]['examples_per_s']:>12,.1f}")
    print(f"ratio mixture/uniform tokens/s: {ratio:.3f} (target >= 0.99)")
    step_s = best["mixture"]["train_seconds"] / args.steps
    draw_s = per_step / rates[6, per_step]
    print(f"sampler cost per step: {draw_s * 1e6:,.0f} us of a {step_s * 1e3:,.1f} ms step "
          f"({100 * draw_s / step_s:.2f}%)")


if __name__ == "__main__":
    main()
