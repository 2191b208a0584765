"""Cross-field rules: the problems a well-typed config can still have, and the warnings for valid settings that
do not do what their name suggests."""

from __future__ import annotations

import math
from pathlib import Path

from taskpgm_ray.config.sections import BUILTIN_MODEL_NAMES, Config, TaskConfig, resolve_path
from taskpgm_ray.names import name_problem


def _template_problem(template: str | None) -> str | None:
    """Why ``template`` cannot format a row with ``str.format(**row)``, or None when it can (or is None)."""
    import string

    if template is None:
        return None
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return f"{template!r} is not a valid str.format template ({exc}); write a literal brace as {{{{ or }}}}"
    positional = [f for f in fields if f == "" or f.split(".")[0].split("[")[0].isdigit()]
    if positional:
        return (f"{template!r} has a positional field {{{positional[0]}}}; name a column instead, "
                f"e.g. {{prompt}}")
    return None


def _check_task(t: TaskConfig, where: str, cfg: Config, base: Path, seen: dict[str, str],
                problems: list[str]) -> None:
    """A task's or an evaluation set's problems; ``seen`` maps each name to where it was first given."""
    if t.name in seen:
        problems.append(f"{where}.name: duplicate task name {t.name!r} (also {seen[t.name]})")
    seen.setdefault(t.name, where)
    if (problem := name_problem(t.name)) is not None:  # the name becomes probes/<name> and export code
        problems.append(f"{where}.name: {problem}")
    for key in ("prompt_template", "response_template"):
        if (problem := _template_problem(getattr(t, key))) is not None:
            problems.append(f"{where}.{key}: {problem}")
    if t.source in ("disk", "jsonl", "parquet", "csv"):
        p = Path(t.path) if Path(t.path).is_absolute() else base / t.path
        if not p.exists():
            problems.append(f"{where}.path: file not found: {p}")
        elif t.source == "disk" and not p.is_dir():
            problems.append(f"{where}.path: source 'disk' needs a save_to_disk directory: {p}")
    if t.source == "hub" and cfg.is_offline:
        problems.append(f"{where}.source: hub dataset {t.path!r} requested while offline (HF_HUB_OFFLINE=1)")
    if t.max_examples is not None and t.max_examples < 1:
        problems.append(f"{where}.max_examples: must be >= 1, got {t.max_examples}")


# Lower bounds of the numeric fields the rules in _check do not cover: (section, field, bound, strict). None (a
# field's "not set") is skipped; NaN and inf never get here (the builder refuses them).
_LOWER_BOUNDS = (
    ("probes", "lora_alpha", 0, True), ("probes", "num_gpus", 0, False), ("probes", "num_cpus", 0, False),
    ("probes", "max_retries", 0, False),
    ("estimation", "num_gpus_per_actor", 0, False), ("estimation", "num_cpus_per_actor", 0, False),
    ("estimation", "batch_size", 1, False), ("estimation", "jsd_top_k", 1, False),
    ("estimation", "max_actor_restarts", 0, False), ("estimation", "bootstrap", 0, False),
    ("energy", "eps", 0, False),
    ("train", "cpus_per_worker", 0, False), ("train", "lr", 0, True), ("train", "warmup_steps", 0, False),
    ("train", "weight_decay", 0, False), ("train", "eval_every", 0, False), ("train", "checkpoint_every", 0, False),
    ("train", "max_failures", 0, False),
    ("tune", "num_samples", 0, False), ("tune", "trial_steps", 1, False), ("tune", "trial_workers", 1, False),
    ("tune", "trial_cpus_per_worker", 0, False), ("tune", "asha_grace", 1, False), ("tune", "max_concurrent", 1, False),
)


def _check_bounds(cfg: Config, problems: list[str]) -> None:
    """``_LOWER_BOUNDS``, the tiny models' shapes, estimation.stop_when_stable and the lists Tune searches."""
    def low(where: str, v: object, bound: float, strict: bool) -> None:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (v <= bound if strict else v < bound):
            problems.append(f"{where}: must be {'>' if strict else '>='} {bound}, got {v}")

    for section, name, bound, strict in _LOWER_BOUNDS:
        low(f"{section}.{name}", getattr(getattr(cfg, section), name), bound, strict)
    for section, m in (("model", cfg.model), ("proxy_model", cfg.proxy_model)):
        if m is not None and m.tiny is not None:
            for name in ("hidden_size", "num_layers", "intermediate_size"):
                low(f"{section}.tiny.{name}", getattr(m.tiny, name), 1, False)
    rule = cfg.estimation.stop_when_stable
    if rule is not None:
        low("estimation.stop_when_stable.tol", rule.tol, 0, True)
        low("estimation.stop_when_stable.patience", rule.patience, 1, False)
        if isinstance(rule.min_fraction, float) and not 0 <= rule.min_fraction <= 1:
            problems.append(f"estimation.stop_when_stable.min_fraction: must be in [0, 1], got {rule.min_fraction}")
    for name, bound, strict in (("taus", 0, True), ("prior_strengths", 0, False), ("budgets", 1, False)):
        for i, v in enumerate(getattr(cfg.tune, name) or []):
            low(f"tune.{name}[{i}]", v, bound, strict)


def _check(cfg: Config, problems: list[str]) -> None:
    base = Path(cfg.config_path).parent if cfg.config_path else Path.cwd()
    if not cfg.tasks and cfg.synthetic is None:
        problems.append("tasks: no tasks: give `tasks` or `synthetic`")
    if cfg.synthetic is not None and cfg.synthetic.spec is not None:
        spec = resolve_path(cfg, cfg.synthetic.spec)
        if not spec.exists():
            problems.append(f"synthetic.spec: file not found: {spec}")
    if cfg.synthetic is not None and isinstance(cfg.synthetic.scale, float) and cfg.synthetic.scale <= 0:
        problems.append(f"synthetic.scale: must be > 0, got {cfg.synthetic.scale}")
    seen: dict[str, str] = {}
    for section in ("tasks", "evaluation"):
        for i, t in enumerate(getattr(cfg, section)):
            if t is not None:
                _check_task(t, f"{section}[{i}]", cfg, base, seen, problems)
    s = cfg.splits
    for name in ("probe_fraction", "eval_fraction"):
        v = getattr(s, name)
        if isinstance(v, float) and not 0.0 < v < 1.0:
            problems.append(f"splits.{name}: must be in (0, 1), got {v}")
    for name in ("min_probe", "max_probe", "max_eval"):
        v = getattr(s, name)
        if isinstance(v, int) and v < 1:
            problems.append(f"splits.{name}: must be >= 1, got {v}")
    if isinstance(s.min_probe, int) and isinstance(s.max_probe, int) and 1 <= s.max_probe < s.min_probe:
        problems.append(f"splits.min_probe: {s.min_probe} exceeds splits.max_probe {s.max_probe}")
    for section, m in (("model", cfg.model), ("proxy_model", cfg.proxy_model)):
        if m is None:
            continue
        if m.name == "tiny" and isinstance(m.tiny.hidden_size, int) and isinstance(m.tiny.num_heads, int):
            if m.tiny.num_heads < 1 or m.tiny.hidden_size % m.tiny.num_heads:
                problems.append(f"{section}.tiny.num_heads: hidden_size {m.tiny.hidden_size} is not divisible by "
                                f"{m.tiny.num_heads}")
        if m.name not in ("tiny", *BUILTIN_MODEL_NAMES) and cfg.is_offline and not Path(m.name).exists():
            problems.append(f"{section}.name: {m.name!r} is neither 'tiny', a builtin model "
                            f"({', '.join(BUILTIN_MODEL_NAMES)}) nor a local path, and we are offline")
        if isinstance(m.max_length, int) and m.max_length < 8:
            problems.append(f"{section}.max_length: must be >= 8, got {m.max_length}")
    e = cfg.energy
    if e.unary == "utility":
        missing = [t.name for t in cfg.tasks if t is not None and t.utility is None]
        if missing or cfg.synthetic is not None:
            who = ", ".join(missing) if missing else "the synthetic suite's tasks"
            problems.append(f"energy.unary: 'utility' needs tasks[*].utility on every task; missing for {who}")
    if e.affinity == "jsd" and not cfg.estimation.jsd:
        problems.append("energy.affinity: 'jsd' needs estimation.jsd: true")
    if isinstance(e.lam, float) and e.lam < 0:
        problems.append(f"energy.lam: must be >= 0, got {e.lam}")
    if isinstance(e.tau, float) and e.tau <= 0:
        problems.append(f"energy.tau: must be > 0, got {e.tau}")
    if isinstance(e.beta, float) and e.beta < 0:
        problems.append(f"energy.beta: must be >= 0, got {e.beta} (a negative beta turns the unary term upside down)")
    if isinstance(e.floor, float) and not 0 <= e.floor <= 1:
        problems.append(f"energy.floor: must be in [0, 1], got {e.floor}")
    if isinstance(e.prior_strength, float) and e.prior_strength < 0:
        problems.append(f"energy.prior_strength: must be >= 0, got {e.prior_strength}")
    if isinstance(e.prior_temperature, float) and e.prior_temperature <= 0:
        problems.append(f"energy.prior_temperature: must be > 0, got {e.prior_temperature}")
    if isinstance(e.min_weight, float) and not 0 <= e.min_weight <= 1:
        problems.append(f"energy.min_weight: must be in [0, 1] (a share of the mixture), got {e.min_weight}")
    if isinstance(e.max_weight, float) and not 0 < e.max_weight <= 1:
        problems.append(f"energy.max_weight: must be in (0, 1] (a share of the mixture), got {e.max_weight}")
    if e.min_weight is not None and e.max_weight is not None and e.min_weight > e.max_weight:
        problems.append(f"energy.min_weight: {e.min_weight} exceeds energy.max_weight {e.max_weight}")
    bounded = e.min_weight is not None or e.max_weight is not None or e.floor > 0 or cfg.train.repetition_cap
    if bounded and e.method not in ("exact", "first_order"):
        problems.append(f"energy.method: {e.method!r} does not support per-task bounds (energy.floor, min/max weight, "
                        f"train.repetition_cap); use 'exact' or 'first_order', or set energy.floor: 0")
    if e.budget is not None and e.budget < 1:
        problems.append(f"energy.budget: must be >= 1, got {e.budget}")
    pr = cfg.probes
    for name in ("steps", "batch_size", "lora_rank"):
        v = getattr(pr, name)
        if isinstance(v, int) and v < 1:
            problems.append(f"probes.{name}: must be >= 1, got {v}")
    if isinstance(pr.lr, float) and not pr.lr > 0:
        problems.append(f"probes.lr: must be > 0, got {pr.lr}")
    tr = cfg.train
    if tr.zero_stage not in (0, 1, 2, 3):
        problems.append(f"train.zero_stage: must be 0, 1, 2 or 3, got {tr.zero_stage}")
    if tr.offload == "cpu" and tr.zero_stage == 0:
        problems.append("train.offload: CPU offload needs train.zero_stage >= 1")
    for name in ("num_workers", "steps", "micro_batch_size", "grad_accum"):
        v = getattr(tr, name)
        if isinstance(v, int) and v < 1:
            problems.append(f"train.{name}: must be >= 1, got {v}")
    if tr.repetition_cap is not None and tr.repetition_cap <= 0:
        problems.append(f"train.repetition_cap: must be > 0, got {tr.repetition_cap}")
    if isinstance(cfg.estimation.num_actors, int) and cfg.estimation.num_actors < 1:
        problems.append(f"estimation.num_actors: must be >= 1, got {cfg.estimation.num_actors}")
    if isinstance(cfg.estimation.shard_size, int) and cfg.estimation.shard_size < 1:
        problems.append(f"estimation.shard_size: must be >= 1, got {cfg.estimation.shard_size}")
    if cfg.estimation.active is True:
        if cfg.estimation.jsd:
            problems.append("estimation.active: true scores only some (proxy, probe shard) pairs, and the JSD "
                            "affinity needs every pair: set estimation.jsd: false")
        if cfg.estimation.stop_when_stable is not None:
            problems.append("estimation.stop_when_stable: estimation.active has its own stop rule (active_tol); "
                            "set stop_when_stable: null")
    if isinstance(cfg.estimation.info_prompts, int) and not 2 <= cfg.estimation.info_prompts <= 64:
        problems.append(f"estimation.info_prompts: must be between 2 and 64, got {cfg.estimation.info_prompts}")
    if isinstance(cfg.estimation.active_tol, (int, float)) and not cfg.estimation.active_tol > 0:
        problems.append(f"estimation.active_tol: must be > 0, got {cfg.estimation.active_tol}")
    tu = cfg.tune
    if len(tu.ratio_range) != 2 or not (0 < tu.ratio_range[0] <= tu.ratio_range[1]):
        problems.append(f"tune.ratio_range: must be [low, high] with 0 < low <= high, got {tu.ratio_range}")
    if len(tu.temperature_range) != 2 or not (0 < tu.temperature_range[0] <= tu.temperature_range[1]):
        problems.append(f"tune.temperature_range: must be [low, high] with 0 < low <= high, got "
                        f"{tu.temperature_range}")
    for i, T in enumerate(tu.temperatures or []):
        if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
            problems.append(f"tune.temperatures[{i}]: must be a finite number > 0, got {T!r}")
    if isinstance(tu.trial_evals, int) and not 1 <= tu.trial_evals <= max(1, tu.trial_steps or tu.trial_evals):
        problems.append(f"tune.trial_evals: must be between 1 and tune.trial_steps, got {tu.trial_evals}")
    for i, a in enumerate(tu.affinities):
        if a not in ("pmi", "jsd"):
            problems.append(f"tune.affinities[{i}]: must be 'pmi' or 'jsd', got {a!r}")
        elif a == "jsd" and not cfg.estimation.jsd:
            problems.append(f"tune.affinities[{i}]: 'jsd' needs estimation.jsd: true")
    for i, u in enumerate(tu.unaries or []):
        if u not in ("representativeness", "information", "utility"):
            problems.append(f"tune.unaries[{i}]: must be 'representativeness', 'information' or 'utility', got {u!r}")
    for i, k in enumerate(tu.kernels):
        if k not in ("psd", "clip", "exp"):
            problems.append(f"tune.kernels[{i}]: must be 'psd', 'clip' or 'exp', got {k!r}")
    _check_bounds(cfg, problems)
    if tu.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            problems.append("tune.search: 'optuna' is not installed (pip install 'taskpgm_ray[optuna]')")


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are valid but do not do what their name suggests, each as ``field.path: message``."""
    out = []
    rule = cfg.estimation.stop_when_stable
    if rule is not None:
        # benchmarks/results/estimate.txt: tol 0.01 stopped at 23% of the shards, 0.060 L1 from the final mixture.
        out.append(f"estimation.stop_when_stable: tol {rule.tol:g} is the mixture's L1 change per shard, not its "
                   f"distance to the final mixture; in benchmarks/estimate.py the rule stopped 0.060 L1 from the "
                   f"final mixture at tol 0.01 (6x). For a bound that holds, use estimation.active (active_tol: "
                   f"the mixture within it of full scoring's, with probability 0.9)")
    return out
