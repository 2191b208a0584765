"""Typed configuration: YAML in, validated dataclasses out, every problem reported at once.

Importable without Ray, torch or DeepSpeed. Each field carries a one-line doc in its metadata; the
README's configuration reference is generated from the same text (`taskpgm config-doc`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from taskpgm_ray.errors import BadInput
from taskpgm_ray.names import name_problem

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TEST_CONFIG = SHIPPED_CONFIGS / "test.yaml"
BUILTIN_MODEL_NAMES = ("synthetic-base",)  # shipped with the package: taskpgm_ray.models.BUILTIN_MODELS


class ConfigWarning(UserWarning):
    """A valid setting that does not do what its name suggests (``config_warnings``)."""


class ConfigError(BadInput):
    """One or more configuration problems; ``problems`` lists them as ``field.path: message``."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        if len(problems) == 1:
            super().__init__(f"{where}{problems[0]}")
        else:
            super().__init__(f"{where}{len(problems)} problems: " + "; ".join(problems))


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a one-line doc string (shown in the configuration reference)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


# --------------------------------------------------------------------------------------------------
# sections


@dataclass
class TaskConfig:
    """One task: where its examples come from and how they become (prompt, response)."""

    name: str = doc("unique task name (used in mixture.json)")
    source: Literal["hub", "disk", "jsonl", "parquet", "csv"] = doc(
        "hub: HF hub id; disk: a save_to_disk directory; jsonl/parquet/csv: a data file"
    )
    path: str = doc("hub id, directory or file path (relative paths are relative to the config file)")
    prompt_field: str = doc("column holding the prompt", "prompt")
    response_field: str = doc("column holding the response", "response")
    prompt_template: str | None = doc(
        "optional str.format template over the columns, e.g. 'Q: {question}\\nA:' (overrides prompt_field)",
        None,
    )
    response_template: str | None = doc("optional template for the response (overrides response_field)", None)
    split: str | None = doc("for hub/disk DatasetDicts: the split used for train/probe (default 'train')", None)
    max_examples: int | None = doc("keep at most this many training examples (seeded choice)", None)
    utility: float | None = doc("optional user-given per-task utility for the energy's unary term", None)
    score: bool = doc("count this task in Tune's selection metric and `taskpgm compare` (false: e.g. known noise)",
                      True)


@dataclass
class SyntheticConfig:
    """The synthetic benchmark suite with planted structure (generated offline, deterministically)."""

    spec: str | None = doc("suite spec file (skills, templates, sizes, roles); null: the shipped default "
                           "(taskpgm_ray/tasks/specs/default.yaml); relative to the config file", None)
    seed: int = doc("suite seed: same spec and seed, same data", 7)
    scale: float = doc("multiplies every task size (default spec at 1.0: 64x skew between largest and smallest)", 1.0)
    include: list[str] | None = doc("only these suite tasks (default: all)", None)


@dataclass
class SplitConfig:
    """How each task's examples are split into train / probe / eval."""

    probe_fraction: float = doc("fraction of a task's training examples held out as its probe set", 0.1)
    max_probe: int = doc("at most this many probe examples per task", 64)
    min_probe: int = doc("at least this many probe examples per task (else an error)", 1)
    eval_fraction: float = doc("fraction held out for eval when the source has no validation split", 0.1)
    max_eval: int = doc("at most this many eval examples per task", 64)
    seed: int = doc("split seed", 0)


@dataclass
class TinyModelConfig:
    """A tiny Llama-style model built from a config: no download."""

    hidden_size: int = doc("model width", 64)
    num_layers: int = doc("decoder layers", 2)
    num_heads: int = doc("attention heads", 4)
    intermediate_size: int = doc("MLP width", 128)
    seed: int = doc("initialisation seed", 0)


@dataclass
class ModelConfig:
    """A causal LM and its tokenizer: the target that is fine-tuned (`model`), or the proxies' base (`proxy_model`)."""

    name: str = doc("'synthetic-base' (the small pretrained base shipped for the synthetic world), 'tiny' "
                    "(random init from `tiny`), or a hub id / local path for AutoModelForCausalLM", "tiny")
    tokenizer: str = doc("'byte' (offline byte-level tokenizer) or a hub id / local path", "byte")
    max_length: int = doc("truncate prompt+response to this many tokens", 128)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "auto: bf16 on a GPU that supports it (Ampere or later), else fp32; float16 trains with loss scaling", "auto"
    )
    chat_template: bool = doc("format (prompt, response) with the tokenizer's chat template (a user turn, then the "
                              "assistant's); the loss still covers the assistant's turn only", False)
    tiny: TinyModelConfig = doc("tiny model shape (used when name is 'tiny')", factory=TinyModelConfig)


@dataclass
class ProbeConfig:
    """Stage 2: one LoRA proxy per task."""

    steps: int = doc("optimizer steps per proxy (150 x 16 examples: measured, benchmarks/proxies.py)", 150)
    batch_size: int = doc("examples per step", 16)
    lr: float = doc("learning rate (1e-3: learns the task without forgetting the rest, benchmarks/proxies.py)",
                    1e-3)
    lora_rank: int = doc("LoRA rank r", 8)
    lora_alpha: float = doc("LoRA alpha", 16.0)
    target_modules: list[str] | None = doc(
        "module names LoRA adapts (suffixes, as peft matches them); null: detected from the architecture (the "
        "attention projections of known families, else every linear layer but the output); ['all-linear']: every "
        "linear layer but the output", None)
    full_finetune: bool = doc("train all weights instead of LoRA (tiny models only)", False)
    seed: int = doc("proxy training seed", 0)
    num_gpus: float = doc("GPUs per probe task (a fraction packs several per GPU)", 0.0)
    num_cpus: float = doc("CPUs per probe task", 1.0)
    max_retries: int = doc("retries per failed probe before it is reported", 2)


@dataclass
class StableConfig:
    """Anytime estimation: stop once the mixture stops moving (a change rule; estimation.active bounds the error)."""

    tol: float = doc("L1 change of the mixture below which an update counts as stable: a change per shard, not a "
                     "distance to the final mixture (at 0.01 the rule stopped 0.060 L1 from it, 6x: "
                     "benchmarks/results/estimate.txt)", 0.01)
    patience: int = doc("consecutive stable updates before stopping", 3)
    min_fraction: float = doc("never stop before this fraction of the shards is scored", 0.1)


@dataclass
class EstimationConfig:
    """Stages 3-4: every proxy scores every probe set."""

    num_actors: int = doc("estimation actors (one per GPU on a cluster)", 2)
    num_gpus_per_actor: float = doc("GPUs per actor", 0.0)
    num_cpus_per_actor: float = doc("CPUs per actor", 1.0)
    shard_size: int = doc("probe examples per shard", 32)
    batch_size: int = doc("examples per forward pass", 32)
    jsd: bool = doc("also accumulate the JSD affinity (top-k compressed)", True)
    jsd_top_k: int = doc("top-k tokens kept per position for the JSD (plus one tail bucket)", 16)
    stop_when_stable: StableConfig | None = doc("anytime stopping; null scores every shard", None)
    active: bool = doc(
        "score a cheap first pass, then only the (proxy, probe shard) pairs whose scoring moves the mixture most; "
        "the rest of the likelihood matrix is filled in by matrix completion (mixture/active.py), and scoring "
        "stops when the mixture is certain within active_tol. Needs jsd: false (the JSD needs every pair)", False)
    active_tol: float = doc("active: stop when, at two checks in a row, the mixture is within this L1 of the "
                            "full-scoring one with probability 0.9 (bootstrap of the completed matrix)", 0.01)
    info_prompts: int = doc(
        "K: each probe answer of a task is scored by its own proxy and the base under its own prompt and K - 1 "
        "other prompts of the same shard, for the bounded input-output information (at most log K nats)", 4)
    max_actor_restarts: int = doc("restarts per actor before its shards move elsewhere", 2)
    bootstrap: int = doc("bootstrap resamples for the confidence bands on the weights", 100)


# The paper's energy exactly (TaskPGM, arXiv 2507.12612), for `EnergyConfig(**PAPER_ENERGY)` or a config's
# `energy:` section: the PSD-shifted PMI affinity and its row sums, unscaled, no prior.
PAPER_ENERGY = {"kernel": "psd", "unary": "representativeness", "normalize": False, "prior": "none", "floor": 0.0}


@dataclass
class EnergyConfig:
    """Stage 5: E(p) = (lam/2) p^T S p - beta u^T p on the simplex (+ a prior term). The paper's energy exactly:
    kernel psd, unary representativeness, normalize false, prior none."""

    affinity: Literal["pmi", "jsd"] = doc("which affinity builds S", "pmi")
    kernel: Literal["psd", "clip", "exp"] = doc(
        "psd: symmetrise + shift the diagonal to PSD (the paper's); clip: symmetrise + clip negative "
        "eigenvalues to 0 (the nearest PSD matrix); exp: exp(S / tau)", "clip")
    tau: float = doc("temperature of the exp kernel", 1.0)
    eps: float = doc("ridge added to the kernel matrix", 1e-6)
    beta: float = doc("weight of the unary term", 1.0)
    lam: float = doc("weight of the pairwise term", 1.0)
    unary: Literal["representativeness", "information", "utility"] = doc(
        "representativeness: row sums of S (the paper's); information: each proxy's bounded estimate of its "
        "task's input-output mutual information, as a fraction of its bound log K (noise has none; answer length "
        "does not count); utility: the tasks' `utility` fields",
        "information")
    normalize: bool = doc("scale the kernel matrix to a mean diagonal of 1 and the unary to a largest |u| of 1, so "
                          "beta and lam mean the same for any number of tasks or units", True)
    prior: Literal["none", "uniform", "size", "temperature"] = doc(
        "a baseline mixture q the energy leans towards: adds (prior_strength / 2) sum_i (p_i - q_i)^2 / q_i",
        "temperature")
    prior_temperature: float = doc("T of the temperature prior q_i ~ N_i^(1/T)", 2.0)
    prior_strength: float = doc("weight of the prior term (0: none; large: the prior itself)", 0.3)
    prior_skip_output_only: bool = doc(
        "the prior's baseline gives only the floor to tasks whose proxy learned the answers but not their dependence "
        "on the prompt (estimate/signal.json `output_only`). Off by default: noise looks like this, but so does a "
        "real skill beyond a small proxy, and a proxy's failure is no evidence that the target will fail",
        False)
    floor: float = doc("every task gets at least floor / n, a fraction of its uniform weight (capped by the "
                       "repetition cap): a task left out loses even its answer format", 0.2)
    method: Literal["exact", "closed_form", "first_order", "blocks"] = doc("solver", "exact")
    budget: int | None = doc("choose at most k tasks (budgeted greedy)", None)
    min_weight: float | None = doc("per-task minimum weight", None)
    max_weight: float | None = doc("per-task maximum weight", None)


@dataclass
class TrainConfig:
    """Stage 6: Ray Train + DeepSpeed fine-tune on the mixture."""

    num_workers: int = doc("Ray Train workers", 2)
    use_gpu: bool = doc("one GPU per worker", False)
    cpus_per_worker: float = doc("CPUs per worker", 1.0)
    zero_stage: int = doc("DeepSpeed ZeRO stage 0-3", 2)
    offload: Literal["none", "cpu"] = doc("ZeRO optimizer offload (stage >= 1)", "none")
    torch_optimizer: bool = doc(
        "hand DeepSpeed a plain torch AdamW (no JIT op compile; see RAY_NOTES)", True
    )
    steps: int = doc("optimizer steps", 200)
    micro_batch_size: int = doc("examples per worker per micro-step", 8)
    grad_accum: int = doc("micro-steps per optimizer step", 1)
    lr: float = doc("peak learning rate", 3e-3)
    warmup_steps: int = doc("linear warm-up steps, then cosine decay to 10%", 10)
    weight_decay: float = doc("AdamW weight decay", 0.0)
    gradient_checkpointing: bool = doc("recompute each layer's activations in the backward pass: activation memory "
                                       "of one layer instead of all, for about a third more compute", False)
    group_by_length: bool = doc("sort each optimizer step's draws by length before cutting them into micro-batches "
                                "and ranks: less padding, the same examples per step", False)
    weight_unit: Literal["examples", "tokens"] = doc(
        "what the mixture weights count: a share of examples drawn, or of tokens trained on", "examples"
    )
    repetition_cap: float | None = doc("max epochs over any one task (null: unlimited)", None)
    eval_every: int = doc("evaluate every N steps (0: only at the end)", 50)
    checkpoint_every: int = doc("checkpoint every N steps (0: only at the end)", 50)
    max_failures: int = doc("worker failures tolerated (resume from the last checkpoint)", 1)
    seed: int = doc("sampler and initialisation seed", 0)
    audit_samples: bool = doc("write every drawn sample id to train/samples-rank<r>.jsonl", False)


@dataclass
class TuneConfig:
    """Stage 7: Ray Tune over the energy hyperparameters."""

    enabled: bool = doc("run the search in `taskpgm run` (off: the config's energy settings are used)", True)
    num_samples: int = doc("TaskPGM trials", 6)
    search: Literal["random", "grid", "optuna"] = doc("search algorithm", "random")
    ratio_range: list[float] = doc("beta/lam range searched on a log scale", factory=lambda: [0.01, 100.0])
    affinities: list[str] = doc("affinities searched", factory=lambda: ["pmi", "jsd"])
    kernels: list[str] = doc("kernels searched", factory=lambda: ["psd", "exp"])
    taus: list[float] = doc("exp-kernel temperatures searched", factory=lambda: [0.5, 1.0, 2.0])
    unaries: list[str] | None = doc("unary terms searched (null: only energy.unary)", None)
    prior_strengths: list[float] | None = doc("prior strengths searched (null: only energy.prior_strength)", None)
    budgets: list[int] | None = doc("budgets k searched (null: no budget)", None)
    trial_steps: int | None = doc("training steps per trial (null: train.steps, so that a trial's ranking is the "
                                  "final fine-tune's; shorter trials rank mixtures that drop tasks too well)", None)
    trial_workers: int = doc("Ray Train workers per trial", 1)
    trial_evals: int = doc("validation evaluations per trial: the rungs at which ASHA may stop a trial", 3)
    trial_cpus_per_worker: float = doc(
        "CPUs per Train worker in a trial (below 1 lets two 1-worker trials share 2 CPUs)", 1.0)
    asha_grace: int = doc("ASHA grace period in evaluations", 1)
    baselines: bool = doc("run uniform/size/temperature as reference trials", True)
    temperatures: list[float] | None = doc(
        "temperatures tried for the temperature baseline (null: as many as TaskPGM's trials, spread evenly on a "
        "log scale over tune.temperature_range: the same search budget for both)", None)
    temperature_range: list[float] = doc("range of the temperatures tried when tune.temperatures is null",
                                         factory=lambda: [1.5, 8.0])
    max_concurrent: int | None = doc("concurrent trials (null: derived from the cluster)", None)


@dataclass
class TrackingConfig:
    """Weights & Biases. The API key only ever comes from WANDB_API_KEY; null fields come from the environment."""

    wandb: Literal["offline", "online", "disabled"] | None = doc(
        "W&B mode; null: WANDB_MODE from the environment, else 'offline'", None)
    project: str | None = doc("W&B project; null: WANDB_PROJECT from the environment, else 'taskpgm'", None)
    entity: str | None = doc("W&B entity; null: WANDB_ENTITY from the environment, else your default entity", None)
    group: str | None = doc("W&B group of every run of this pipeline; null: a unique id made on first use and kept "
                            "in the run directory's wandb_group.txt (a resumed run keeps it)", None)


@dataclass
class Config:
    """A whole taskpgm run."""

    output_dir: str = doc("run directory (relative paths are relative to the working directory)", "runs/default")
    tasks: list[TaskConfig] = doc("tasks from files or the hub", factory=list)
    synthetic: SyntheticConfig | None = doc("add the synthetic suite's tasks (generated offline)", None)
    evaluation: list[TaskConfig] = doc(
        "evaluation sets, never trained on (same fields as tasks; score and utility unused): Tune ranks on their "
        "validation part, `taskpgm compare` scores their test part, each set counting once; a suite's eval_only "
        "tasks join them; empty: the training tasks' own splits", factory=list)
    splits: SplitConfig = doc("train / probe / eval split", factory=SplitConfig)
    model: ModelConfig = doc("the target model (fine-tuned in stage 6) and its tokenizer", factory=ModelConfig)
    proxy_model: ModelConfig | None = doc(
        "the model whose LoRA proxies score the tasks (stages 2-3), with its own tokenizer; same fields as `model`, "
        "and a field left out takes model's value; null: the target model itself", None)
    probes: ProbeConfig = doc("stage 2", factory=ProbeConfig)
    estimation: EstimationConfig = doc("stages 3-4", factory=EstimationConfig)
    energy: EnergyConfig = doc("stage 5", factory=EnergyConfig)
    train: TrainConfig = doc("stage 6", factory=TrainConfig)
    tune: TuneConfig = doc("stage 7", factory=TuneConfig)
    tracking: TrackingConfig = doc("stage 8", factory=TrackingConfig)
    offline: bool = doc("refuse hub downloads (also on when HF_HUB_OFFLINE=1)", False)
    config_path: str | None = field(default=None, metadata={"doc": "(set by the loader)", "internal": True})

    @property
    def is_offline(self) -> bool:
        return self.offline or os.environ.get("HF_HUB_OFFLINE") == "1"

    @property
    def proxy(self) -> ModelConfig:
        """The model the proxies are LoRA adapters on: ``proxy_model``, or ``model`` when it is not set."""
        return self.proxy_model if self.proxy_model is not None else self.model

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML-ready); the loader's internal fields are left out."""
        out = dataclasses.asdict(self)
        out.pop("config_path", None)
        return out


# --------------------------------------------------------------------------------------------------
# loading


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert a YAML value to ``tp``; append ``path: message`` problems instead of raising."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], path, problems)
        for a in inner:  # first that converts cleanly
            trial: list[str] = []
            out = _convert(value, a, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{path}: must be one of {', '.join(map(repr, allowed))}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return []
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        return _build(tp, value, path, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        if not math.isfinite(value):  # YAML's .nan / .inf: no field means anything by them
            problems.append(f"{path}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or 'config'}: expected a mapping, got {data!r}")
        return cls() if _all_defaults(cls) else None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(fields)})"
            problems.append(f"{prefix}{key}: unknown key{hint}")
            continue
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}", problems)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{prefix}{name}: required field missing")
    try:
        return cls(**{k: v for k, v in kwargs.items()})
    except TypeError:
        return None


def _all_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


# --------------------------------------------------------------------------------------------------
# cross-field rules


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
    if tu.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            problems.append("tune.search: 'optuna' is not installed (pip install 'taskpgm_ray[optuna]')")


def load_config(path: str | os.PathLike | None = None, *, test_mode: bool = False,
                overrides: dict[str, Any] | None = None) -> Config:
    """Read, validate and return the config at ``path`` (``configs/test.yaml`` when ``test_mode``).

    Raises:
        ConfigError: listing every problem found, each as ``field.path: message``.
    """
    if path is None:
        if not test_mode:
            raise ConfigError(["no config given: pass CONFIG or --test-mode"])
        path = TEST_CONFIG
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"config file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not a UTF-8 text file (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}); "
                           f"save the config as UTF-8 YAML"], str(path)) from None
    except IsADirectoryError:
        raise ConfigError(["is a directory, not a YAML config file"], str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"invalid YAML{at}: {getattr(exc, 'problem', exc)}"], str(path)) from None
    return config_from_dict(data, source=str(path), overrides=overrides)


def config_from_dict(data: dict[str, Any], *, source: str | None = None,
                     overrides: dict[str, Any] | None = None) -> Config:
    """Validate a plain dict (as read from YAML); ``overrides`` are dotted keys, e.g. ``{"train.steps": 5}``.

    A number indexes a list: ``{"tasks.0.max_examples": 5}``. ``data`` itself is left unchanged.
    """
    data = copy.deepcopy(data) if data else {}
    problems: list[str] = []
    for dotted, value in (overrides or {}).items():
        keys = dotted.split(".")
        node: Any = data
        for depth, key in enumerate(keys):
            where, last = ".".join(keys[:depth]), depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit():
                    problems.append(f"{dotted}: {where} is a list: index it by position, e.g. {where}.0")
                    break
                index, size = int(key), len(node)
                if index >= size:
                    have = (f"has {size} entries (indices 0 to {size - 1})" if size > 1 else
                            "has 1 entry (index 0)" if size == 1 else "is empty")
                    problems.append(f"{dotted}: index {index} is out of range: {where} {have}")
                    break
            elif isinstance(node, dict):
                index: int | str = key
                if not last and node.get(key) is None:  # a section left out (or null): start it
                    node[key] = [] if keys[depth + 1].isdigit() else {}
            else:
                problems.append(f"{dotted}: {where} is {node!r}, not a section or a list")
                break
            if last:
                node[index] = value
            else:
                node = node[index]
    if problems:
        raise ConfigError(problems, source)
    cfg = _build(Config, data, "", problems)
    if cfg is not None and cfg.proxy_model is not None and cfg.model is not None \
            and isinstance(data.get("proxy_model"), dict):
        # A field the proxy_model section leaves out is the target model's (one level: a given `tiny` is whole).
        given = {k: getattr(cfg.proxy_model, k) for k in data["proxy_model"] if hasattr(cfg.proxy_model, k)}
        cfg.proxy_model = dataclasses.replace(cfg.model, **given)
    if cfg is not None:
        cfg.config_path = str(Path(source).resolve()) if source else None
        if not problems:
            _check(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    for message in config_warnings(cfg):
        warnings.warn(f"{source}: {message}" if source else message, ConfigWarning, stacklevel=2)
    return cfg


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


def resolve_path(cfg: Config, p: str) -> Path:
    """A path from the config, relative to the config file's directory."""
    q = Path(p)
    if q.is_absolute() or cfg.config_path is None:
        return q
    return Path(cfg.config_path).parent / q


def reference_markdown() -> str:
    """The configuration reference (every section and field with its default and doc) as markdown."""
    lines: list[str] = []
    documented: dict[type, str] = {}  # section class -> where its table is (proxy_model points to model's)

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows, nested = [], []
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            tp = hints[f.name]
            inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if _is_dataclass_type(inner[0]) and typing.get_origin(tp) is not list:
                if inner[0] not in documented:  # a section of its own
                    documented[inner[0]] = f"{prefix}{f.name}"
                    nested.append((f, inner[0]))
                else:  # the same fields as a section above: one row that points there
                    rows.append(f"| `{prefix}{f.name}` | the fields of `{documented[inner[0]]}` \\| null | "
                                f"`{f.default!r}` | {f.metadata.get('doc', '')} |")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            type_name = _type_name(tp).replace("|", "\\|")  # a literal pipe would split the table cell
            rows.append(f"| `{prefix}{f.name}` | {type_name} | `{default!r}` | {f.metadata.get('doc', '')} |")
        if rows:
            title = prefix.rstrip(".") or "top level"
            lines.extend([f"**{title}** — {cls.__doc__}", "", "| field | type | default | meaning |",
                          "| --- | --- | --- | --- |", *rows, ""])
        for f, sub in nested:
            walk(sub, f"{prefix}{f.name}.")

    walk(Config, "")
    walk(TaskConfig, "tasks[].")
    return "\n".join(lines)
