"""The configuration's sections: typed dataclasses, one per YAML section, each field with a one-line doc.

Also the config's errors and warnings, and the paths and constants other modules share. Importable without
Ray, torch or DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from taskpgm_ray.errors import BadInput

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
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
    active: bool | Literal["auto"] = doc(
        "score a cheap first pass, then only the (proxy, probe shard) pairs whose scoring moves the mixture most; "
        "the rest of the likelihood matrix is filled in by matrix completion (mixture/completion.py), and scoring "
        "stops when the mixture is certain within active_tol. true needs jsd: false (the JSD needs every pair). "
        "auto: on where it pays, at ACTIVE_AUTO_MIN_TASKS (40) tasks or more when jsd is false and "
        "stop_when_stable is null (README, Active estimation)", "auto")
    active_tol: float = doc("active: stop when, at two checks in a row, the mixture is within this L1 of the "
                            "full-scoring one with probability 0.9 (bootstrap of the completed matrix)", 0.01)
    info_prompts: int = doc(
        "K: each probe answer of a task is scored by its own proxy and the base under its own prompt and K - 1 "
        "other prompts of the same shard (at most shard_size), for the bounded input-output information (at most "
        "log K nats). 16 was chosen on the tuning worlds 1000-1001 (README, Worlds nobody tuned on); with 4 every "
        "learned skill sat at the bound", 16)
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
    unlearned: Literal["zero", "neutral"] = doc(
        "the information unary of a task whose proxy shows no input-output information (95% lower bound <= 0: a "
        "skill beyond the proxy, or noise): zero (the unary pushes it below its prior share) or neutral (the "
        "prior-weighted mean of the others' unary: it keeps its prior share, up to the pairwise term)", "zero")
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


def resolve_path(cfg: Config, p: str) -> Path:
    """A path from the config, relative to the config file's directory."""
    q = Path(p)
    if q.is_absolute() or cfg.config_path is None:
        return q
    return Path(cfg.config_path).parent / q


ACTIVE_AUTO_MIN_TASKS = 40  # estimation.active "auto": from here on active estimation pays (README, Active estimation)


def active_estimation(cfg: Config, n_tasks: int) -> bool:
    """Whether the estimate stage scores actively: ``estimation.active`` true, or "auto" with at least
    ``ACTIVE_AUTO_MIN_TASKS`` tasks, no JSD (it needs every pair) and no other stop rule."""
    e = cfg.estimation
    if e.active == "auto":
        return n_tasks >= ACTIVE_AUTO_MIN_TASKS and not e.jsd and e.stop_when_stable is None
    return bool(e.active)
