"""Stage 8: plots and tables of a finished run (``report/``), and the same to W&B.

Reads only artefacts (tasks.json, likelihoods.npz, mixture.json, estimate/signal.json, estimate/progress.json,
train/summary.json, tune/results.json, compare/results.json), so ``taskpgm report RUN_DIR`` works on any run
directory, also one copied from a cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from taskpgm_ray.config import TrackingConfig
from taskpgm_ray.figures import plot_affinity, plot_losses, plot_mixtures, plot_tune
from taskpgm_ray.io import atomic_write_json, atomic_write_text

BASELINE_TEMPERATURE = 2.0  # the temperature baseline drawn beside the mixture when Tune did not pick one


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(v: Any, missing: str = "") -> str:
    """A report cell: floats to 4 decimals, None as ``missing``."""
    return f"{v:.4f}" if isinstance(v, float) else (missing if v is None else str(v))


def _table_markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def run_tracking(run_dir: str | Path) -> TrackingConfig:
    """The W&B settings a run was made with (its saved ``config.yaml``), else the defaults."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    saved = (yaml.safe_load(path.read_text()) or {}).get("tracking") if path.exists() else None
    return TrackingConfig(**saved) if saved else TrackingConfig()


def make_report(run_dir: str | Path, *, tracking: TrackingConfig | None = None) -> dict[str, Any]:
    """Write ``report/`` (PNG plots, ``summary.json``, ``summary.md``) for a run; log them to W&B."""
    from taskpgm_ray.mixture import baseline_weights, pmi_affinity

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "mixture.json").exists():
        raise FileNotFoundError(f"{run_dir}: not a finished run directory (no mixture.json)")
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    mixture = json.loads((run_dir / "mixture.json").read_text())
    names = list(mixture["weights"])
    sizes = np.array([mixture["sizes"][n] for n in names], dtype=float)
    plots: dict[str, Path] = {}

    if (run_dir / "likelihoods.npz").exists():
        with np.load(run_dir / "likelihoods.npz") as f:
            lik_names = [str(t) for t in f["tasks"]]
            L = f["loglik_sum"] / f["count"][None, :]
        plots["affinity"] = plot_affinity(lik_names, pmi_affinity(L), out / "affinity.png",
                                          "PMI affinity (clustered order)")
    mixtures = {f"chosen ({mixture['method']})": np.array([mixture["weights"][n] for n in names])}
    for kind in ("uniform", "size"):
        mixtures[kind] = baseline_weights(kind, sizes)
    mixtures[f"temperature T={BASELINE_TEMPERATURE:g}"] = baseline_weights("temperature", sizes,
                                                                           temperature=BASELINE_TEMPERATURE)
    plots["mixture"] = plot_mixtures(names, mixtures, out / "mixture.png")

    summary = _read_json(run_dir / "train" / "summary.json") or {}
    if summary and (p := plot_losses(summary, out / "loss.png")):
        plots["loss"] = p
    tune_results = _read_json(run_dir / "tune" / "results.json")
    if tune_results and (p := plot_tune(tune_results, out / "tune.png")):
        plots["tune"] = p

    signal = _read_json(run_dir / "estimate" / "signal.json")
    estimate = _read_json(run_dir / "estimate" / "progress.json")
    compare = _read_json(run_dir / "compare" / "results.json")
    if compare and (run_dir / "compare" / "compare.png").exists():
        import shutil

        plots["compare"] = Path(shutil.copyfile(run_dir / "compare" / "compare.png", out / "compare.png"))
    rows = []
    for n in names:
        rows.append({
            "task": n, "weight": mixture["weights"][n], "uniform": 1.0 / len(names),
            "train_size": int(mixture["sizes"][n]),
            "samples": (summary.get("samples_per_task") or {}).get(n),
            "eval_loss": (summary.get("eval_loss_per_task") or {}).get(n),
            "eval_accuracy": (summary.get("eval_accuracy_per_task") or {}).get(n),
            "test_loss": (summary.get("test_loss_per_task") or {}).get(n),
            "test_accuracy": (summary.get("test_accuracy_per_task") or {}).get(n),
        })
    held = [e["name"] for e in (_read_json(run_dir / "tasks.json") or {}).get("evaluation", [])]
    evaluation = [{"set": n, "eval_loss": (summary.get("eval_loss_per_task") or {}).get(n),
                   "test_loss": (summary.get("test_loss_per_task") or {}).get(n),
                   "test_accuracy": (summary.get("test_accuracy_per_task") or {}).get(n)} for n in held]
    report = {
        "run_dir": str(run_dir), "method": mixture["method"], "affinity": mixture.get("affinity"),
        "evaluation": evaluation,
        "hyperparameters": mixture.get("hyperparameters"), "eval_loss_mean": summary.get("eval_loss_mean"),
        "test_loss_scored": summary.get("test_loss_scored"),
        "throughput": summary.get("throughput"), "tasks": rows,
        "tune_best": (tune_results or {}).get("best", {}).get("validation_loss"),
        "signal": signal, "compare": _compare_digest(compare), "estimation": _estimation_digest(estimate),
        "plots": {k: str(v.relative_to(run_dir)) for k, v in plots.items()},
    }
    md = [f"# taskpgm report: {run_dir.name}", "",
          f"Mixture: **{mixture['method']}** (affinity {mixture.get('affinity')}), "
          f"hyperparameters `{json.dumps(mixture.get('hyperparameters'))}`.", "",
          f"Mean test loss after the fine-tune ({'the evaluation sets, never trained on' if held else 'scored tasks'};"
          f" no selection saw the test split): **{_fmt(summary.get('test_loss_scored'), 'n/a')}**. "
          f"Validation loss ({'the evaluation sets' if held else 'scored tasks'}, what Tune selected on): "
          f"{_fmt(summary.get('eval_loss_scored'), 'n/a')}.",
          "", _table_markdown(rows, ["task", "weight", "uniform", "train_size", "samples", "eval_loss",
                                     "eval_accuracy", "test_loss", "test_accuracy"]), ""]
    if evaluation:
        md += ["Evaluation sets:", "", _table_markdown(evaluation, ["set", "eval_loss", "test_loss", "test_accuracy"]),
               ""]
    md += estimation_markdown(estimate, mixture=mixture,
                              selected=_read_json(run_dir / "select" / "certainty.json"))
    md += signal_markdown(signal)
    if compare:
        from taskpgm_ray.compare import summary_markdown

        md += [summary_markdown(compare).replace("# taskpgm compare", "## taskpgm compare", 1), ""]
    md += [f"![{k}]({v.name})" for k, v in plots.items()]
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    atomic_write_json(out / "summary.json", report)
    _log_wandb(tracking or TrackingConfig(), run_dir, report, plots)
    return report


def signal_markdown(signal: dict | None) -> list[str]:
    """The estimate stage's signal checks as markdown lines: warnings first, then the per-task table."""
    if not signal:
        return []
    lines = ["## Signal checks (estimate stage)", ""]
    if signal.get("warnings"):
        lines += [f"- **warning**: {w}" for w in signal["warnings"]] + [""]
    if "affinity" in signal:
        a = signal["affinity"]
        lines += [f"PMI affinity signal-to-noise: **{a['snr']:.2f}** ({'signal' if a['has_signal'] else 'NOISE'}; "
                  f"bootstrap over probe examples, {signal['resamples']} resamples).", ""]
    columns = ["task", "gain", "gain_low", "gain_high", "learned", "information", "information_bound",
               "output_only", "nearest"]
    rows = [{"task": k, **{c: v.get(c) for c in columns[1:]}} for k, v in signal["tasks"].items()]
    return lines + [_table_markdown(rows, columns), "",
                    "information: the proxy's bounded estimate of the task's input-output mutual information "
                    "(nats per example, at most information_bound = log K); output_only is a diagnostic.", ""]


def estimation_markdown(progress: dict | None, *, mixture: dict | None = None,
                        selected: dict | None = None) -> list[str]:
    """How much of the likelihood matrix the estimate stage measured (``estimate/progress.json``), as markdown:
    one line, and with active estimation the stop rule's verdict and a proxy x task table of the share of
    each entry's probe examples that were scored (blank: filled in by matrix completion).

    The rule's bound is for one energy's mixture. It is shown as the bound of ``mixture`` (the run's
    ``mixture.json``) only when it is for that mixture's energy: the estimate stage's (the config's energy) or
    ``selected`` (``select/certainty.json``, the check redone for a Tune trial's energy); otherwise it is
    labelled as the config's energy's, with its beta, lam and prior strength."""
    if not progress or "measured" not in progress:  # a run from before the field existed
        return []
    names = progress["tasks"]
    lines = ["## Estimation", "",
             f"Scored {progress['fraction_pairs']:.1%} of the {len(names)}x{len(names)} (proxy, probe set) pairs, "
             f"{progress['fraction_units']:.1%} of the (proxy, probe shard) units, "
             f"{progress['fraction_examples']:.1%} of the proxy-example scorings"
             + (" (active estimation: the other entries of the likelihood matrix are filled in by matrix "
                "completion)." if progress["active"] else "."), ""]
    c = progress.get("certainty")
    if c:
        lines += [_certainty_line(c, mixture, selected), ""]
    if progress["active"] and len(names) <= 30:
        rows = [{"proxy / task": a, **{b: (f"{v:.2f}" if v > 0 else "") for b, v in zip(names, row)}}
                for a, row in zip(names, progress["measured"])]
        lines += ["Measured entries (share of the task's probe examples the proxy scored):", "",
                  _table_markdown(rows, ["proxy / task", *names]), ""]
    return lines


def _certainty_line(c: dict, mixture: dict | None, selected: dict | None) -> str:
    """The stop rule's verdict, with its bound said of the mixture it is for (see ``estimation_markdown``)."""
    rule = f"Stop rule: {c['stopped_by']} (tol {c['tol']:g}, probability {c['level']:g}); "
    config_energy = f"the config's energy ({_energy_label(c['energy'])})" if c.get("energy") else "the config's energy"
    if mixture is not None and selected and _is_energy_of(mixture, selected.get("energy")):
        return (rule + f"the chosen mixture ({_energy_label(selected['energy'])}) is within "
                f"**{selected['declared_l1']:.3g}** L1 of its full-scoring mixture with probability "
                f"{selected['level']:g} (the rule's last check redone for this energy; for {config_energy}: "
                f"{c['declared_l1']:.3g}).")
    if mixture is not None and _is_energy_of(mixture, c.get("energy")):
        return (rule + f"the chosen mixture ({_energy_label(c['energy'])}) is within **{c['declared_l1']:.3g}** L1 "
                f"of the full-scoring one with probability {c['level']:g}.")
    shown = f" It is not a bound on the chosen mixture ({mixture['method']})." if mixture is not None else ""
    return (rule + f"for {config_energy}, the estimate stage's mixture is within **{c['declared_l1']:.3g}** L1 "
            f"of the full-scoring one with probability {c['level']:g}." + shown)


def _is_energy_of(mixture: dict, energy: dict | None) -> bool:
    """Whether ``mixture`` (a mixture.json) was solved with ``energy`` (an ``EnergyConfig`` as a dict)."""
    hyper = mixture.get("hyperparameters") or {}
    return (bool(energy) and mixture.get("method") == "taskpgm" and mixture.get("affinity") == energy["affinity"]
            and all(k in hyper and hyper[k] == v for k, v in energy.items() if k != "affinity"))


def _energy_label(energy: dict) -> str:
    return (f"beta={energy['beta']:g}, lam={energy['lam']:g}, prior_strength={energy['prior_strength']:g}, "
            f"kernel {energy['kernel']}, unary {energy['unary']}")


def _estimation_digest(progress: dict | None) -> dict | None:
    if not progress or "measured" not in progress:
        return None
    return {k: progress[k] for k in ("active", "fraction_pairs", "fraction_units", "fraction_examples",
                                     "certainty", "measured")}


def _compare_digest(compare: dict | None) -> dict | None:
    if not compare:
        return None
    return {"metric": compare["metric"], "mean_test_loss": compare["mean_test_loss"],
            "taskpgm_wins": compare["taskpgm_wins"], "seeds": len(compare["seeds"])}


def _log_wandb(tracking: TrackingConfig, run_dir: Path, report: dict, plots: dict[str, Path]) -> None:
    from taskpgm_ray.tracking import log_mixture, wandb_run

    with wandb_run(tracking, run_dir, job_type="report", name="report") as run:
        if run is None:
            return
        import wandb

        columns = ["task", "weight", "uniform", "train_size", "samples", "eval_loss", "eval_accuracy"]
        run.log({
            **{f"report/{k}": wandb.Image(str(v)) for k, v in plots.items()},
            "report/tasks": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in report["tasks"]]),
        })
        run.summary["eval_loss_mean"] = report["eval_loss_mean"]
        if report.get("signal"):
            run.summary["signal/warnings"] = report["signal"]["warnings"]
        if report.get("compare"):
            run.summary["compare/mean_test_loss"] = report["compare"]["mean_test_loss"]
        run.summary["mixture"] = {r["task"]: r["weight"] for r in report["tasks"]}
        log_mixture(run, run_dir / "mixture.json")
