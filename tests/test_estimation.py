"""Stages 3-5 on a real local Ray cluster with real (tiny) models: the likelihood matrix against a serial
reference, an actor killed mid-run, an interrupted run resumed, a task added, and bad input."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from taskpgm_ray.config import TEST_CONFIG, config_from_dict
from taskpgm_ray.distributed.estimation import estimate_command, resolve_proxies
from taskpgm_ray.distributed.probes import probe_command, probe_dir
from taskpgm_ray.distributed.scoring import EstimationActor, EstimationError, make_shards, scoring_settings
from taskpgm_ray.report import estimation_markdown
from taskpgm_ray.tasks import load_tasks

TASKS = ["reverse_a", "copy", "sort", "add"]  # probe sets of 12, 12, 4, 4 examples -> 3 + 3 + 1 + 1 shards


def make_config(out, tasks=TASKS, **overrides):
    data = yaml.safe_load(TEST_CONFIG.read_text())
    base = {"output_dir": str(out), "synthetic.include": list(tasks), "model.name": "tiny",  # fast: mechanics only
            "probes.steps": 4, "probes.batch_size": 8,
            "estimation.shard_size": 4, "estimation.batch_size": 3, "estimation.num_actors": 1,
            "estimation.jsd_top_k": 8, "estimation.bootstrap": 10, "estimation.info_prompts": 3,
            "tracking.wandb": "disabled"}
    return config_from_dict(data, overrides={**base, **overrides})


@pytest.fixture(scope="module")
def probed(ray_cluster, tmp_path_factory):
    """A run directory with the four probe adapters trained."""
    out = tmp_path_factory.mktemp("est") / "run"
    probe_command(make_config(out))
    return out


def copy_run(src, dst):
    """A fresh run directory sharing the probes (the synthetic data is regenerated identically)."""
    dst.mkdir(parents=True)
    shutil.copytree(src / "probes", dst / "probes")
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    return dst


def serial_reference(cfg):
    """A plain single-process computation: each adapter on the base model, one probe example at a time."""
    import torch
    from peft import PeftModel

    from taskpgm_ray.mixture import pairwise_jsd_sum_topk
    from taskpgm_ray.models import (
        IGNORE_INDEX,
        build_model,
        collate,
        encode_example,
        load_tokenizer,
        response_logprobs,
    )

    tasks = load_tasks(cfg)
    tok = load_tokenizer(f"{cfg.output_dir}/tokenizer")
    n, k = len(tasks), cfg.estimation.jsd_top_k
    loglik = np.zeros((n, n))
    idx, logp = [], []
    for i, t in enumerate(tasks):
        net = PeftModel.from_pretrained(build_model(cfg.model, tok), str(probe_dir(cfg, t))).eval()
        ids_i, lp_i = [], []
        with torch.inference_mode():
            for j, task in enumerate(tasks):
                for ex in task.probe:
                    batch = collate([encode_example(tok, ex.prompt, ex.response, cfg.model.max_length)],
                                    tok.pad_token_id)
                    logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loglik[i, j] += float(response_logprobs(logits, batch["labels"])[0])
                    mask = batch["labels"][0, 1:] != IGNORE_INDEX
                    v, ix = torch.log_softmax(logits[0, :-1][mask].float(), -1).topk(k, dim=-1)
                    ids_i.append(ix.numpy())
                    lp_i.append(v.numpy())
        idx.append(np.concatenate(ids_i))
        logp.append(np.concatenate(lp_i))
    jsd = pairwise_jsd_sum_topk(np.stack(idx), np.stack(logp))
    count = np.array([len(t.probe) for t in tasks])

    def score(net, prompt, response):
        batch = collate([encode_example(tok, prompt, response, cfg.model.max_length)], tok.pad_token_id)
        with torch.inference_mode():
            logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(response_logprobs(logits, batch["labels"])[0])

    base = build_model(cfg.model, tok).eval()
    signal = {k: np.zeros(n) for k in ("base_loglik_sum", "information_sum", "base_information_sum",
                                       "information_count", "information_sq_sum", "information_bound_sum",
                                       "information_tokens")}
    size, prompts = cfg.estimation.shard_size, cfg.estimation.info_prompts
    for j, t in enumerate(tasks):
        own = PeftModel.from_pretrained(build_model(cfg.model, tok), str(probe_dir(cfg, t))).eval()
        for s in range(0, len(t.probe), size):
            shard = t.probe[s:s + size]
            K = min(prompts, len(shard))  # its own prompt and K - 1 others of the shard
            for k, ex in enumerate(shard):
                b = score(base, ex.prompt, ex.response)
                signal["base_loglik_sum"][j] += b
                if K < 2:
                    continue
                # answer k under prompts k, k - 1, ..., k - K + 1 (cyclically within the shard), straight from the
                # definition of the bounded information: log q(y|x) - log mean over the K prompts of q(y|x')
                prompts_k = [shard[(k - r) % len(shard)].prompt for r in range(K)]
                own_ll = np.array([score(own, x, ex.response) for x in prompts_k])
                base_ll = np.array([score(base, x, ex.response) for x in prompts_k])
                own_info = own_ll[0] - np.log(np.mean(np.exp(own_ll)))
                base_info = base_ll[0] - np.log(np.mean(np.exp(base_ll)))
                signal["information_sum"][j] += own_info
                signal["base_information_sum"][j] += base_info
                signal["information_sq_sum"][j] += own_info ** 2
                signal["information_bound_sum"][j] += np.log(K)
                enc = collate([encode_example(tok, ex.prompt, ex.response, cfg.model.max_length)], tok.pad_token_id)
                signal["information_tokens"][j] += int((enc["labels"][0, 1:] != IGNORE_INDEX).sum())
                signal["information_count"][j] += 1
    return loglik, count, jsd, len(idx[0]), signal


def load_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def full_run(probed):
    """Estimate three tasks, then all four in the same run directory (the fourth is an added task)."""
    first = estimate_command(make_config(probed, TASKS[:3]))
    first_ll = load_npz(probed / "likelihoods.npz")["loglik_sum"]
    second = estimate_command(make_config(probed, TASKS, **{"tracking.wandb": "offline"}))
    return first, first_ll, second, load_npz(probed / "likelihoods.npz"), load_npz(probed / "jsd.npz")


def test_matrix_matches_serial_reference_and_adding_a_task_scores_only_new_pairs(probed, full_run):
    first, first_ll, second, lik, jsd = full_run
    cfg3, cfg4 = make_config(probed, TASKS[:3]), make_config(probed)
    shards3 = make_shards(load_tasks(cfg3), 4, scoring_settings(cfg3))
    # each shard: 3 adapters, the base, and the own adapter and the base on the pairs rotated by 1 and 2
    # (info_prompts K = 3: each answer under its own prompt and 2 others)
    assert first["scored"] == len(shards3) == 7 and first["adapter_shard_scorings"] == 7 * (3 + 1 + 4)
    assert first["forwards"] == 7 * 2 * (3 + 1 + 4)  # 7 shards of 4 examples = 2 batches (3 + 1)
    # the fourth task: its adapter on the 7 old shards, every adapter (+ base, + rotated) on its 1 new shard
    assert second["shards_cached"] == 0 and second["scored"] == 8
    assert second["adapter_shard_scorings"] == 7 * 1 + 1 * (4 + 1 + 4)

    assert list(lik["tasks"]) == TASKS and lik["loglik_sum"].dtype == np.float64
    ref_ll, ref_count, ref_jsd, ref_tokens, ref_signal = serial_reference(cfg4)
    np.testing.assert_allclose(lik["loglik_sum"], ref_ll, rtol=1e-6, atol=0)
    for key, ref in ref_signal.items():  # the base model's scores and the input-output information sums
        np.testing.assert_allclose(lik[key], ref, rtol=1e-6, atol=1e-4, err_msg=key)  # batched float32
    np.testing.assert_array_equal(lik["count"], ref_count)
    assert list(lik["sizes"]) == [len(t.train) for t in load_tasks(cfg4)]
    np.testing.assert_array_equal(lik["loglik_sum"][:3, :3], first_ll)  # cached rows reused bit for bit

    assert int(jsd["token_count"]) == ref_tokens
    np.testing.assert_allclose(jsd["jsd_sum"], ref_jsd, rtol=1e-5, atol=1e-9)
    assert "jsd_sum_per_task" not in jsd and int(jsd["token_count_per_task"].sum()) == ref_tokens

    mixture = json.loads((probed / "estimate" / "mixture.json").read_text())
    assert mixture["format"] == "taskpgm-mixture/1" and mixture["method"] == "taskpgm"
    assert mixture["affinity"] == "pmi" and set(mixture["weights"]) == set(TASKS)
    assert abs(sum(mixture["weights"].values()) - 1) < 1e-9 and min(mixture["weights"].values()) >= 0
    assert {"beta", "lam", "kernel", "tau", "unary", "prior"} <= set(mixture["hyperparameters"])
    assert mixture["inputs_hash"] and not (probed / "mixture.json").exists()  # the select step writes that
    signal = json.loads((probed / "estimate" / "signal.json").read_text())
    assert set(signal["tasks"]) == set(TASKS) and signal["affinity"]["snr"] > 0
    for name, t in signal["tasks"].items():  # 4-step proxies of a random model: the checks must say so
        assert t["gain_low"] <= t["gain"] <= t["gain_high"] and t["nearest"] in TASKS and t["nearest"] != name
        assert t["learned"] == (t["gain_low"] > 0 and t["gain"] >= 0.05)
    assert len(signal["warnings"]) >= sum(not t["learned"] for t in signal["tasks"].values())
    examples = load_npz(probed / "estimate" / "examples.npz")
    assert examples["loglik"].shape == (4, int(ref_count.sum()))
    np.testing.assert_allclose(examples["loglik"].sum(1), ref_ll.sum(1), rtol=1e-6)
    progress = json.loads((probed / "estimate" / "progress.json").read_text())
    assert progress["fraction_used"] == 1.0 and progress["trajectory"]
    assert not progress["active"] and progress["fraction_pairs"] == 1.0 and progress["certainty"] is None
    np.testing.assert_array_equal(progress["measured"], np.ones((4, 4)))
    np.testing.assert_array_equal(lik["measured"], np.ones((4, 4)))
    assert set(progress["bootstrap"]["low"]) == set(TASKS)
    assert all(progress["bootstrap"]["low"][t] <= progress["bootstrap"]["high"][t] for t in TASKS)
    assert (probed / "estimate" / "affinity.png").stat().st_size > 1000
    assert list((probed / "wandb").glob("offline-run-*")), "no offline W&B run written"


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_and_a_killed_actor_changes_nothing(probed, full_run, tmp_path):
    import ray

    _, _, clean, clean_ll, clean_jsd = full_run  # the clean four-task run
    clean_forwards = 8 * 2 * (4 + 1 + 4)  # 8 shards x 2 batches x (4 adapters + base + 4 rotated)
    run = copy_run(probed, tmp_path / "run")
    cfg = make_config(run)

    def stop_after_two(done, actors):
        if done == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        estimate_command(cfg, on_result=stop_after_two)
    done_keys = {p.stem for p in (run / "estimate" / "shards").glob("*.npz")}
    assert len(done_keys) == 2 and not (run / "likelihoods.npz").exists()

    killed = []

    def kill_one(done, actors):
        if done == 1:  # the other actor still has shards in flight: they must be re-queued
            ray.kill(actors[1], no_restart=False)
            killed.append(True)

    cfg = make_config(run, **{"estimation.num_actors": 2})
    resumed = estimate_command(cfg, on_result=kill_one)
    assert killed and resumed["actor_failures"] >= 1 and resumed["requeued"] >= 1
    assert resumed["shards_cached"] == 2 and resumed["scored"] == 8 - 2
    per_shard = {s.key: (4 + 1 + 4) * 2 for s in make_shards(load_tasks(cfg), 4, scoring_settings(cfg))}
    assert resumed["forwards"] == clean_forwards - sum(per_shard[k] for k in done_keys)
    got = load_npz(run / "likelihoods.npz")
    np.testing.assert_array_equal(got["loglik_sum"], clean_ll["loglik_sum"])
    np.testing.assert_array_equal(got["count"], clean_ll["count"])
    np.testing.assert_array_equal(load_npz(run / "jsd.npz")["jsd_sum"], clean_jsd["jsd_sum"])
    again = estimate_command(cfg)
    assert again["scored"] == 0 and again["shards_cached"] == 8


def test_bad_input_messages(probed, tmp_path):
    import dataclasses

    import torch
    from safetensors.torch import load_file, save_file

    cfg = make_config(probed)
    tasks = load_tasks(cfg)
    empty = [dataclasses.replace(tasks[0], probe=[])] + tasks[1:]
    with pytest.raises(EstimationError, match=r"task\(s\) 'reverse_a' have no probe examples"):
        estimate_command(cfg, tasks=empty)

    bare = make_config(tmp_path / "bare")
    with pytest.raises(EstimationError, match=r"no finished probe adapter for task\(s\) 'reverse_a' .*taskpgm probe"):
        estimate_command(bare)

    gpus = make_config(probed, **{"estimation.num_gpus_per_actor": 1})
    with pytest.raises(ValueError, match=r"estimation .* needs 1 GPU\(s\) but the Ray cluster has 0"):
        estimate_command(gpus)

    broken = copy_run(probed, tmp_path / "broken")
    cfg_b = make_config(broken)
    weights = probe_dir(cfg_b, tasks[1]) / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file")
    proxies = resolve_proxies(cfg_b, tasks)
    threads = torch.get_num_threads()
    actor = EstimationActor(dataclasses.asdict(cfg_b.model), str(broken / "tokenizer"), proxies, 3, 8)
    torch.set_num_threads(threads)
    with pytest.raises(EstimationError, match=r"cannot load the adapter of task 'copy' from .*/copy-"):
        actor.load()  # in-process: the same class the Ray actor runs

    weights.write_bytes(good)
    state = load_file(str(weights))
    name = next(k for k in state if "lora_B" in k)
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(weights))
    with pytest.raises(EstimationError, match=r"non-finite log-likelihood nan for probe example '.+' \(task '.+'\) "
                                              r"under the adapter of task 'copy'"):
        estimate_command(cfg_b)


def test_active_estimation_scores_part_of_the_pairs_and_resumes(probed, tmp_path):
    """estimation.active: a first pass and rounds of chosen (proxy, shard) units, the rest of L filled in;
    the mixture stays within 0.02 L1 of full scoring, an interrupted run resumes without rescoring, and a
    re-run of the finished one scores nothing."""
    full_run_dir = copy_run(probed, tmp_path / "full")
    full = estimate_command(make_config(full_run_dir, **{"estimation.jsd": False}))
    full_ll = load_npz(full_run_dir / "likelihoods.npz")["loglik_sum"]

    run = copy_run(probed, tmp_path / "active")
    # tol 0.05: with 4 tasks (16 pairs, 32 (proxy, shard) units, 24 in the first pass) a tighter rule has
    # nothing left to save; the check below is the one that counts: the stopped mixture is within 0.02.
    cfg = make_config(run, **{"estimation.jsd": False, "estimation.active": True, "estimation.active_tol": 0.05,
                              "tracking.wandb": "offline"})

    def stop_after_three(done, actors):
        if done == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        estimate_command(cfg, on_result=stop_after_three)
    shard_files = list((run / "estimate" / "shards").glob("*.npz"))
    on_disk = sum(len(load_npz(p)["adapters"]) for p in shard_files)
    assert len(shard_files) == 3 and not (run / "likelihoods.npz").exists()

    active = estimate_command(cfg)
    after = sum(len(load_npz(p)["adapters"]) for p in (run / "estimate" / "shards").glob("*.npz"))
    assert after == on_disk + active["adapter_shard_scorings"]  # nothing scored twice after the interruption
    l1 = sum(abs(active["weights"][t] - full["weights"][t]) for t in TASKS)
    assert l1 <= 0.02, f"active mixture {l1:.4f} L1 from full scoring"

    progress = json.loads((run / "estimate" / "progress.json").read_text())
    measured = np.array(progress["measured"])
    assert progress["active"] and measured.shape == (4, 4)
    assert progress["fraction_pairs"] == np.mean(measured > 0) and np.min(measured) < 1
    assert 0.5 <= progress["fraction_units"] < 1 and progress["fraction_examples"] < 1
    np.testing.assert_array_equal(np.diag(measured), np.ones(4))  # every proxy on its own task, in full
    certainty = progress["certainty"]
    assert certainty["stopped_by"] == "certainty" and certainty["declared_l1"] <= certainty["tol"] == 0.05
    assert [row["certain"] for row in progress["trajectory"][-2:]] == [True, True]
    lik = load_npz(run / "likelihoods.npz")
    np.testing.assert_array_equal(lik["measured"], measured)
    full_cells = measured == 1
    np.testing.assert_allclose(lik["loglik_sum"][full_cells], full_ll[full_cells], rtol=1e-12)  # measured: exact
    assert np.all(np.isfinite(lik["loglik_sum"]))  # the solver's matrix is complete
    assert np.isnan(load_npz(run / "estimate" / "examples.npz")["loglik"]).any()  # unscored examples stay NaN
    md = "\n".join(estimation_markdown(progress))  # the report's lines
    assert f"Scored {progress['fraction_pairs']:.1%} of the 4x4 (proxy, probe set) pairs" in md
    assert "Stop rule: certainty" in md and "| proxy / task | reverse_a | copy | sort | add |" in md

    wandb = Path(sys.executable).parent / "wandb"  # the offline W&B run: the fraction and the measured cells
    (wb_run,) = (run / "wandb").glob("offline-run-*")
    logged = subprocess.run([str(wandb), "leet", "inspect", str(wb_run), "--json", "--summary"],
                            capture_output=True, text=True, check=True).stdout
    found = re.search(r'"fraction_pairs": ([-+.e0-9]+)', logged)
    assert found and float(found.group(1)) == progress["fraction_pairs"] and "estimate/measured" in logged

    again = estimate_command(cfg)
    assert again["scored"] == 0 and again["weights"] == active["weights"]

    # The bound is for one energy's mixture. Redone from estimate/active.npz for the config's energy it is the
    # stage's own last check; for a Tune trial's energy (select/certainty.json) it is that mixture's own bound,
    # and the report says which mixture it is for.
    from taskpgm_ray.distributed.active_driver import active_certainty
    from taskpgm_ray.pipeline import selected_certainty

    tasks = load_tasks(cfg)
    assert active_certainty(cfg, tasks, cfg.energy)["declared_l1"] == certainty["declared_l1"]
    assert certainty["energy"] == dataclasses.asdict(cfg.energy)
    other = dataclasses.replace(cfg.energy, beta=4.0, prior_strength=0.0)
    trial = json.loads((run / "estimate" / "mixture.json").read_text())
    trial["hyperparameters"].update(beta=4.0, prior_strength=0.0)
    (run / "mixture.json").write_text(json.dumps(trial))
    selected = selected_certainty(cfg, tasks)
    assert selected == json.loads((run / "select" / "certainty.json").read_text())
    assert selected["energy"] == dataclasses.asdict(other)
    assert selected["weights"] != progress["trajectory"][-1]["weights"]
    md = "\n".join(estimation_markdown(progress, mixture=trial, selected=selected))
    assert "the chosen mixture (beta=4, lam=1, prior_strength=0" in md and "redone for this energy" in md

    # A re-run with another energy is another mixture: it does not stop at once on the old streak.
    changed = estimate_command(make_config(run, **{"estimation.jsd": False, "estimation.active": True,
                                                   "estimation.active_tol": 0.05, "energy.beta": 4.0,
                                                   "energy.prior_strength": 0.0}))
    assert changed["certainty"]["energy"] == dataclasses.asdict(other)
    assert changed["trajectory"][0]["weights"] != progress["trajectory"][-1]["weights"]  # a new check, not the old
    assert changed["certainty"]["stopped_by"] == "everything scored" or (
        len(changed["trajectory"]) >= 2 and changed["scored"] > 0)  # two new certain checks, with scoring between
