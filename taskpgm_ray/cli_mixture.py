"""``taskpgm solve`` and ``taskpgm export``: the commands that make or convert a mixture file from files alone.

Neither reads a config or starts Ray: ``solve`` turns a saved likelihoods.npz into a mixture.json, ``export``
writes a mixture.json in another tool's format. ``cli.py`` adds both to the ``taskpgm`` group; like the rest of
the CLI, each imports what it needs inside the command.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from taskpgm_ray.config import EnergyConfig
from taskpgm_ray.errors import BadInput

_ENERGY = EnergyConfig()  # the config's energy defaults are also the `solve` command's


def _refuse_overwrite(targets, inputs: dict[str, str | None]) -> None:
    """Refuse before writing when a target file is one of the command's inputs (``{what: path}``), by any name."""
    for target in map(Path, targets):
        for what, source in inputs.items():
            if source and target.exists() and Path(source).exists() and os.path.samefile(target, source):
                raise BadInput(f"--out: {target} is the input {what} ({source}); writing it would destroy the "
                               f"input, so choose another --out")


@click.command()
@click.option("--likelihoods", "lik_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="likelihoods.npz (CONTRACT.md).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="mixture.json to write.")
@click.option("--affinity", type=click.Choice(["pmi", "jsd"]), default="pmi", show_default=True)
@click.option("--jsd", "jsd_path", type=click.Path(dir_okay=False), default=None,
              help="jsd.npz for --affinity jsd (default: beside the likelihoods).")
@click.option("--kernel", type=click.Choice(["psd", "clip", "exp"]), default=_ENERGY.kernel, show_default=True)
@click.option("--tau", type=float, default=_ENERGY.tau, show_default=True, help="exp-kernel temperature.")
@click.option("--unary", type=click.Choice(["representativeness", "information"]), default=_ENERGY.unary,
              show_default=True, help="information needs the signal arrays `taskpgm estimate` writes.")
@click.option("--normalize/--no-normalize", default=_ENERGY.normalize, show_default=True,
              help="Scale the kernel to mean diagonal 1 and the unary to max |u| = 1.")
@click.option("--prior", type=click.Choice(["none", "uniform", "size", "temperature"]), default=_ENERGY.prior,
              show_default=True, help="Baseline mixture the energy leans towards (size/temperature need sizes).")
@click.option("--prior-temperature", type=float, default=_ENERGY.prior_temperature, show_default=True)
@click.option("--prior-strength", type=float, default=_ENERGY.prior_strength, show_default=True)
@click.option("--skip-output-only/--no-skip-output-only", "prior_skip_output_only",
              default=_ENERGY.prior_skip_output_only, show_default=True,
              help="The prior gives only the floor to tasks whose proxy learned the answers but not their "
                   "dependence on the prompt (needs the signal arrays).")
@click.option("--floor", type=float, default=_ENERGY.floor, show_default=True,
              help="Every task gets at least FLOOR / n (0: none).")
@click.option("--beta", type=float, default=_ENERGY.beta, show_default=True, help="Weight of the unary term.")
@click.option("--lam", type=float, default=_ENERGY.lam, show_default=True, help="Weight of the pairwise term.")
@click.option("--method", type=click.Choice(["exact", "closed_form", "first_order", "blocks"]), default="exact",
              show_default=True)
@click.option("--budget", type=int, default=None, help="Choose at most K tasks (budgeted greedy).")
@click.option("--min-weight", type=float, default=None, help="Per-task minimum weight.")
@click.option("--max-weight", type=float, default=None, help="Per-task maximum weight.")
def solve(lik_path: str, out: str, affinity: str, jsd_path: str | None, kernel: str, tau: float, unary: str,
          normalize: bool, prior: str, prior_temperature: float, prior_strength: float, prior_skip_output_only: bool,
          floor: float, beta: float, lam: float, method: str, budget: int | None, min_weight: float | None,
          max_weight: float | None) -> None:
    """Stage 5 alone: the mixture from a saved likelihood matrix.

    The paper's energy exactly: --kernel psd --unary representativeness --no-normalize --prior none --floor 0.
    """
    import dataclasses
    import hashlib

    from taskpgm_ray.config import config_from_dict
    from taskpgm_ray.distributed.solve import solve_from_sums
    from taskpgm_ray.mixture_file import load_jsd, load_likelihoods, load_signal, write_mixture

    jsd_file = (jsd_path or str(Path(lik_path).with_name("jsd.npz"))) if affinity == "jsd" else None
    _refuse_overwrite([out], {"--likelihoods": lik_path, "--jsd": jsd_file})
    if not beta >= 0:  # E(p) = (lam/2) p^T S p - beta u^T p: beta < 0 rewards leaving out the tasks u favours
        raise BadInput(f"--beta must be >= 0, got {beta:g} (a negative beta turns the unary term upside down)")
    energy = {"affinity": affinity, "kernel": kernel, "tau": tau, "unary": unary, "normalize": normalize,
              "prior": prior, "prior_temperature": prior_temperature, "prior_strength": prior_strength,
              "prior_skip_output_only": prior_skip_output_only, "floor": floor,
              "beta": beta, "lam": lam, "method": method, "budget": budget, "min_weight": min_weight,
              "max_weight": max_weight}
    # The same validation as a config file's energy section, so the same mistakes get the same messages.
    checked = config_from_dict({"tasks": [], "synthetic": {}, "energy": energy,
                                "estimation": {"jsd": True}}).energy
    tasks, loglik_sum, count, sizes = load_likelihoods(lik_path)
    if budget is not None and budget > len(tasks):
        raise BadInput(f"--budget must be at most the number of tasks ({len(tasks)} in {lik_path}), got {budget}")
    jsd_sum = jsd_count = None
    if affinity == "jsd":
        jsd_path = jsd_path or str(Path(lik_path).with_name("jsd.npz"))
        if not Path(jsd_path).exists():
            raise click.UsageError(f"--affinity jsd needs {jsd_path} (or --jsd PATH)")
        jsd_sum, jsd_count = load_jsd(jsd_path, tasks, lik_path)
    signal = load_signal(lik_path)
    if unary == "information" and signal is None:
        raise BadInput(f"{lik_path}: --unary information needs the signal arrays that `taskpgm estimate` writes "
                       f"(base_loglik_sum, information_sum, ...); use --unary representativeness for this file")
    if prior in ("size", "temperature") and sizes is None:
        raise BadInput(f"{lik_path}: --prior {prior} needs the 'sizes' array; use --prior uniform or none")
    weights, sol, _ = solve_from_sums(loglik_sum, count, jsd_sum, jsd_count, checked, signal=signal, sizes=sizes)
    hyper = {k: v for k, v in dataclasses.asdict(checked).items() if k != "affinity"}
    size_map = {t: int(s) for t, s in zip(tasks, sizes)} if sizes is not None else {t: 0 for t in tasks}
    write_mixture(out, weights=dict(zip(tasks, map(float, weights))), method="taskpgm", affinity=affinity,
                  hyperparameters=hyper, energy=sol.energy, kkt_residual=sol.kkt_residual, sizes=size_map,
                  inputs_hash=hashlib.sha256(Path(lik_path).read_bytes() + repr(hyper).encode()).hexdigest()[:16])
    top = sorted(zip(tasks, weights), key=lambda kv: -kv[1])[:5]
    click.echo(f"wrote {out}: energy {sol.energy:.6g}, KKT residual {sol.kkt_residual:.2e}; top: " +
               ", ".join(f"{t}={w:.3f}" for t, w in top))


@click.command()
@click.argument("mixture_path", type=click.Path(dir_okay=False, exists=True))
@click.option("--to", "to", required=True, type=click.Choice(["hf", "llamafactory", "axolotl", "megatron", "json"]))
@click.option("--names", "names_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="YAML/JSON mapping task -> the dataset the tool knows: hf a load_dataset path or folder, "
                   "llamafactory a dataset_info.json entry (a string: its file_name), axolotl a datasets entry "
                   "(a string: its path), megatron a data prefix. Default: the task name.")
@click.option("--num-samples", "num_samples", type=int, default=None,
              help="llamafactory, axolotl: examples to train on in all (default: the most that repeat no "
                   "example, from the mixture's sizes).")
@click.option("--mean-tokens", "mean_tokens_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="YAML/JSON {task: mean tokens per example}, or a run's train/summary.json: converts example "
                   "weights to megatron's token shares (and token weights to example shares for the others).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="hf: the interleave seed; axolotl: the seed its shard subsets are drawn with.")
@click.option("--out", "out", type=click.Path(), default=None,
              help="Write the file the tool reads here instead of printing (llamafactory: a directory, for "
                   "dataset_info.json and mixture_llamafactory.yaml; megatron: a --data-args-path file).")
def export(mixture_path: str, to: str, names_path: str | None, num_samples: int | None,
           mean_tokens_path: str | None, seed: int, out: str | None) -> None:
    """The mixture in another framework's format (weight-0 tasks left out, the rest renormalised)."""
    from taskpgm_ray.exporters import build_export, merge_dataset_info, read_mean_tokens, read_names
    from taskpgm_ray.io import atomic_write_text
    from taskpgm_ray.mixture_file import read_mixture

    result = build_export(read_mixture(mixture_path), to,
                          names=read_names(names_path) if names_path else None, num_samples=num_samples,
                          mean_tokens=read_mean_tokens(mean_tokens_path) if mean_tokens_path else None, seed=seed)
    if not out:
        click.echo(result.text, nl=not result.text.endswith("\n"))
        return
    if len(result.files) > 1 or Path(out).is_dir():  # a directory: each file under its own name
        if Path(out).exists() and not Path(out).is_dir():
            raise BadInput(f"--out {out}: --to {to} writes {' and '.join(result.files)}, so --out must be a "
                           f"directory")
        targets = {Path(out) / name: text for name, text in result.files.items()}
    else:
        targets = {Path(out): next(iter(result.files.values()))}
    _refuse_overwrite(targets, {"MIXTURE_PATH": mixture_path, "--names": names_path,
                                "--mean-tokens": mean_tokens_path})
    merged = {}
    for path in targets:  # LLaMA-Factory keeps every dataset in one file: add ours, keep the user's
        if to == "llamafactory" and path.name == "dataset_info.json":
            targets[path], merged[path] = merge_dataset_info(path, targets[path])
    for path, text in targets.items():
        atomic_write_text(path, text)
        kept = f" (merged: kept {merged[path]} entr{'y' if merged[path] == 1 else 'ies'} already there)" \
            if merged.get(path) else ""
        click.echo(f"wrote {path}{kept}")
    for note in result.notes:
        click.echo(f"note: {note}")
