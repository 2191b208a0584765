"""The shard cache: ``<output_dir>/estimate/shards/<key>.npz``, one record per shard with a row per key scored
(and the top-k arrays and pairwise JSD sums for the JSD), so a re-run scores only what is missing.

Ray touch-points: none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from taskpgm_ray.distributed.scoring import Shard
from taskpgm_ray.io import atomic_savez


def read_shard(path: Path) -> dict | None:
    """A cached shard record, or None when absent or unreadable (then it is simply recomputed)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            hashes = [str(h) for h in f["adapters"]]
            rec = {"loglik": {h: f["loglik"][i] for i, h in enumerate(hashes)}, "n_tokens": f["n_tokens"],
                   "topk": {}, "jsd_hashes": None, "jsd_sum": None}
            if "topk_idx" in f:
                with_topk = [str(h) for h in f["topk_adapters"]]
                rec["topk"] = {h: (f["topk_idx"][i], f["topk_logp"][i]) for i, h in enumerate(with_topk)}
            if "jsd_adapters" in f:
                rec["jsd_hashes"] = [str(h) for h in f["jsd_adapters"]]
                rec["jsd_sum"] = f["jsd_sum"]
        return rec
    except Exception:  # a foreign or damaged file: recompute rather than fail the stage
        return None


def write_shard(path: Path, shard: Shard, rec: dict) -> None:
    hashes = sorted(rec["loglik"])
    arrays: dict[str, Any] = {"example_ids": np.array(shard.example_ids), "adapters": np.array(hashes),
                              "loglik": np.stack([rec["loglik"][h] for h in hashes]), "n_tokens": rec["n_tokens"]}
    with_topk = sorted(rec["topk"])
    if with_topk:
        arrays["topk_adapters"] = np.array(with_topk)
        arrays["topk_idx"] = np.stack([rec["topk"][h][0] for h in with_topk])
        arrays["topk_logp"] = np.stack([rec["topk"][h][1] for h in with_topk])
    if rec["jsd_hashes"] is not None:
        arrays["jsd_adapters"] = np.array(rec["jsd_hashes"])
        arrays["jsd_sum"] = rec["jsd_sum"]
    atomic_savez(path, **arrays)


def merge_record(rec: dict | None, new: dict) -> dict:
    """A cached record updated with an actor's result (new rows win; the new JSD matrix replaces the old)."""
    rec = rec or {"loglik": {}, "topk": {}, "n_tokens": new["n_tokens"], "jsd_hashes": None, "jsd_sum": None}
    rec["loglik"].update(new["loglik"])
    rec["topk"].update(new["topk"])
    if new["n_tokens"] is not None:
        rec["n_tokens"] = new["n_tokens"]
    if new["jsd_hashes"] is not None:
        rec["jsd_hashes"], rec["jsd_sum"] = new["jsd_hashes"], new["jsd_sum"]
    return rec


def jsd_pairs(rec: dict, order: list[str]) -> np.ndarray | None:
    """The (n, n) JSD sums for the proxies ``order`` from a record, or None if it does not cover them."""
    if rec["jsd_hashes"] is None or not set(order) <= set(rec["jsd_hashes"]):
        return None
    pos = [rec["jsd_hashes"].index(h) for h in order]
    return np.asarray(rec["jsd_sum"])[np.ix_(pos, pos)]




def missing_keys(rec: dict | None, keys: list[str], order: list[str], jsd: bool) -> list[str]:
    """The keys a record still lacks (a proxy also needs its top-k arrays when the JSD is on)."""
    if rec is None:
        return list(keys)
    proxies = set(order)
    return [h for h in keys if h not in rec["loglik"] or (jsd and h in proxies and h not in rec["topk"])]
