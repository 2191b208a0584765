"""Stage 6 on every Ray Train worker: the mixture fine-tune recipe, ``setup -> train -> cleanup``.

Everything a worker needs arrives in ``train_loop_config`` (built by ``launch.build_trainer``): the train,
model and tracking configs, the DeepSpeed config, the tokenizer path, the task names, the mixture weights, and a
reference to the examples in Ray's object store (``launch.put_task_data``), never the examples themselves.

The Ray and DeepSpeed touch points, numbered as in the code:
  [0] ``ray.get(config["task_data"])``  the tasks' examples, from the object store
  [1] ``ray.train.get_context()``      rank and world size
  [2] ``deepspeed.initialize``          wraps model, torch AdamW and LR schedule (Ray already made the process group)
  [3] ``ray.train.get_checkpoint``      + ``engine.load_checkpoint``: resume after a failure or a re-run
  [4] ``engine.backward / engine.step`` gradient accumulation, clipping, ZeRO partitioning
  [5] ``engine.save_checkpoint``        + ``ray.train.report(checkpoint=...)``: Ray merges every rank's shards
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from taskpgm_ray.models import (
    IGNORE_INDEX,
    build_model,
    collate,
    enable_activation_checkpointing,
    encode_example,
    load_tokenizer,
)
from taskpgm_ray.train.deepspeed_config import lr_multiplier, with_precision
from taskpgm_ray.train.sampler import MixtureSampler

DS_TAG = "deepspeed"          # DeepSpeed's checkpoint tag inside a Ray checkpoint directory
STATE_FILE = "train_state.json"  # step, sampler state, counters, history (written by rank 0)
HF_MODEL_DIR = "hf_model"     # the final model (save_pretrained), in the last checkpoint only
MAX_NEW_TOKENS = 32           # cap on greedy decoding for exact match: answers are short


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train entry point; rank 0 returns the run summary (``Result.return_value``).

    ``config["recipe"]`` is the recipe class, :class:`MixtureFinetune` unless a test or benchmark passes a
    subclass to ``build_trainer`` (a failure injected after some step, another sampler): the product loop
    itself has no test or baseline branches.
    """
    recipe = (config.get("recipe") or MixtureFinetune)(config)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()


class MixtureFinetune:
    """Fine-tune a causal LM on a task mixture with DeepSpeed, on one Ray Train worker."""

    def __init__(self, config: dict[str, Any]):
        import ray.train

        self.config = config
        self.tc = config["train"]                      # TrainConfig (steps already overridden)
        self.task_names: list[str] = list(config["task_names"])
        ctx = ray.train.get_context()                  # [1]
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.is_rank_zero = self.rank == 0
        self.device = torch.device("cpu")
        self.step = 0                                  # optimizer steps done
        self.tokens_per_task = np.zeros(len(self.task_names), dtype=np.int64)
        self.loss_curve: list[float] = []              # mean training loss of every step (all ranks)
        self.history: list[dict[str, Any]] = []        # one row per evaluation
        self.last_eval: dict[str, Any] = {}
        self.train_seconds, self.tokens_seen, self.examples_seen = 0.0, 0, 0  # this attempt only
        self._exit = contextlib.ExitStack()
        self._audit = None                             # open audit log (or None)
        self._audit_ids: list[str] = []                # this step's sample ids on this rank
        self._progress_at = 0.0                        # when rank 0 last wrote progress.json (monotonic)
        self.wandb = None

    # ----------------------------------------------------------------------------------------------
    # setup

    def setup(self) -> None:
        t0 = time.perf_counter()
        self._setup_data()
        self._setup_sampler()
        t1 = time.perf_counter()
        self._setup_engine()
        t2 = time.perf_counter()
        self._resume_from_checkpoint()
        self._setup_audit()
        self._setup_tracking()
        if self.is_rank_zero:
            print(f"setup: data {t1 - t0:.1f}s, engine {t2 - t1:.1f}s, resume+tracking {time.perf_counter() - t2:.1f}s",
                  flush=True)

    def _setup_data(self) -> None:
        """Fetch the examples and tokenize each once (the same on every rank: tokenizing is deterministic)."""
        import ray

        tasks = ray.get(self.config["task_data"])  # [0]
        if [t["name"] for t in tasks] != self.task_names:
            raise RuntimeError("task_data holds other tasks than task_names: build the config with build_trainer")
        self.tokenizer = load_tokenizer(self.config["tokenizer_path"])
        max_length, chat = self.config["model"].max_length, self.config["model"].chat_template
        encode = functools.partial(encode_example, self.tokenizer, max_length=max_length, chat_template=chat)
        self.train_ids: list[list[str]] = []
        self.train_encoded: list[list[tuple[list[int], list[int]]]] = []
        for task in tasks:
            self.train_ids.append([ex_id for ex_id, _, _ in task["train"]])
            self.train_encoded.append([encode(p, r) for _, p, r in task["train"]])
        lengths = [np.array([len(ids) for ids, _ in enc], dtype=np.int64) for enc in self.train_encoded]
        self.mean_tokens = np.array([x.mean() if len(x) else 0.0 for x in lengths])
        self.task_offsets = np.concatenate([[0], np.cumsum([len(x) for x in lengths])]).astype(np.int64)
        self.flat_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        self.eval_sets = [[(encode(p, r), r) for _, p, r in task["eval"]] for task in tasks]
        # The final model's test scores (``final_test``): only tasks that have a test split.
        with_test = [i for i, task in enumerate(tasks) if task.get("test")] if self.config.get("final_test") else []
        self.test_names = [self.task_names[i] for i in with_test]
        self.test_sets = [[(encode(p, r), r) for _, p, r in tasks[i]["test"]] for i in with_test]
        self.test_result: dict[str, Any] = {}

    def _setup_sampler(self) -> None:
        sizes = [len(enc) for enc in self.train_encoded]
        # Baselines (uniform, size, temperature) are weights like any other: one sampler for every mixture.
        self.sampler = MixtureSampler(self.task_names, sizes, self.config["weights"], seed=self.tc.seed,
                                      unit=self.tc.weight_unit, mean_tokens=self.mean_tokens,
                                      repetition_cap=self.tc.repetition_cap)
        self.global_micro_batch = self.tc.micro_batch_size * self.world_size
        if self.is_rank_zero:
            print(self.sampler.describe(), flush=True)

    def _setup_engine(self) -> None:
        import deepspeed

        if self.tc.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            # CPU: skip DeepSpeed's shared-memory comm op (a JIT compile); Ray's gloo group does the collectives.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        torch.manual_seed(self.tc.seed)
        model = build_model(self.config["model"], self.tokenizer, on_gpu=self.tc.use_gpu)
        if self.tc.gradient_checkpointing:
            enable_activation_checkpointing(model)  # activation memory of one layer, for ~1/3 more compute
        # Mixed precision follows the dtype the model was built in, which only this worker (it sees the GPU) knows.
        ds_config = with_precision(self.config["ds_config"], next(model.parameters()).dtype)
        optimizer = (torch.optim.AdamW(model.parameters(), lr=self.tc.lr, weight_decay=self.tc.weight_decay)
                     if self.tc.torch_optimizer else None)
        schedule = functools.partial(lr_multiplier, warmup_steps=self.tc.warmup_steps, total_steps=self.tc.steps)
        self.engine, _, _, _ = deepspeed.initialize(  # [2]
            model=model,
            optimizer=optimizer,
            model_parameters=None if optimizer is not None else model.parameters(),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=ds_config,
            dist_init_required=False,
        )

    def _resume_from_checkpoint(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()  # [3]
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            self.engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
            state = json.loads((Path(d) / STATE_FILE).read_text())
            rng_file = Path(d) / f"rng-rank{self.rank}.pt"
            if rng_file.exists():
                _set_rng_state(torch.load(rng_file, weights_only=False))
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.tokens_per_task = np.asarray(state["tokens_per_task"], dtype=np.int64)
        self.loss_curve, self.history = state["loss_curve"], state["history"]
        self.last_eval = self.history[-1] if self.history else {}
        if self.is_rank_zero:
            print(f"resumed at step {self.step} ({self.sampler.draws} draws)", flush=True)

    def _setup_audit(self) -> None:
        """Every drawn sample id to ``train/samples-rank<r>.jsonl``; a resume drops lines after the checkpoint."""
        if not self.tc.audit_samples:
            return
        path = Path(self.config["run_dir"]) / "train" / f"samples-rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.step > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in kept))
        self._audit = self._exit.enter_context(path.open("a"))

    def _setup_tracking(self) -> None:
        """W&B on rank 0 only (RAY_NOTES: setup_wandb(rank_zero_only=True) is not enough under Train V2)."""
        tracking = self.config["tracking"]
        if not self.is_rank_zero or tracking.wandb == "disabled":
            return
        import wandb

        from taskpgm_ray.tracking import wandb_run

        self.wandb = self._exit.enter_context(wandb_run(
            tracking, self.config["run_dir"], job_type="train", name=self.config.get("name"),
            config={"train": vars(self.tc), "world_size": self.world_size,
                    "weights": dict(zip(self.task_names, self.config["weights"]))}))
        table = wandb.Table(columns=["task", "weight"],
                            data=[[n, float(w)] for n, w in zip(self.task_names, self.config["weights"])])
        self.wandb.log({"mixture": wandb.plot.bar(table, "task", "weight", title="mixture weights")}, step=self.step)

    # ----------------------------------------------------------------------------------------------
    # train

    def train(self) -> dict[str, Any] | None:
        steps, reported_final = self.tc.steps, False
        self.engine.train()
        while self.step < steps:
            t0 = time.perf_counter()
            loss = self._train_step()
            self.train_seconds += time.perf_counter() - t0
            self.step += 1
            self.loss_curve.append(loss)

            # Log, evaluate, checkpoint.
            lr = self.engine.get_lr()[0]
            if self.wandb is not None:
                self.wandb.log({"train/loss": loss, "train/lr": lr, **self._throughput("train/")}, step=self.step)
            is_last = self.step == steps
            eval_now = is_last or _every(self.step, self.tc.eval_every)
            checkpoint_now = is_last or _every(self.step, self.tc.checkpoint_every)
            if eval_now or checkpoint_now:  # every report carries a fresh evaluation (Tune's metric)
                self._evaluate_and_report(loss, lr, checkpoint=checkpoint_now, final=is_last)
                reported_final = is_last
            self._write_progress(loss, force=eval_now)
        if not reported_final:  # resumed from the final checkpoint: report it again so the driver gets the model
            self._evaluate_and_report(self.loss_curve[-1] if self.loss_curve else float("nan"),
                                      self.engine.get_lr()[0], checkpoint=True, final=True)
        if self.test_sets:  # after every report: nothing selects on these numbers
            self.test_result = self._evaluate(self.test_sets, self.test_names)
        return self._summary() if self.is_rank_zero else None

    def _train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss over all ranks."""
        losses = []
        for tasks, examples, mine in self._micro_batches():
            lengths = self.flat_lengths[self.task_offsets[tasks] + examples]
            self.tokens_per_task += np.bincount(tasks, weights=lengths, minlength=len(self.task_names)).astype(np.int64)
            self.tokens_seen += int(lengths.sum())
            self.examples_seen += len(tasks)
            if self._audit is not None:
                self._audit_ids.extend(self.train_ids[t][i] for t, i in zip(tasks[mine], examples[mine]))
            batch = collate([self.train_encoded[t][i] for t, i in zip(tasks[mine], examples[mine])],
                            self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}  # (B, T) each

            loss = self.engine(**batch).loss  # mean NLL over this micro-batch's response tokens
            self.engine.backward(loss)        # [4] scales by 1/grad_accum, reduces gradients across ranks
            self.engine.step()                # [4] optimizer + LR step at the accumulation boundary only
            losses.append(loss.detach().float())
        if self._audit is not None:
            self._audit.write(json.dumps({"step": self.step + 1, "ids": self._audit_ids}) + "\n")
            self._audit_ids = []
        mean = torch.stack(losses).mean().to(self.device)
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= self.world_size
        return float(mean)

    def _write_progress(self, loss: float, *, force: bool = False) -> None:
        """Rank 0: step, loss, eval loss, tokens/s to ``progress.json`` (at most once a second unless ``force``);
        the driver shows it as the stage's live line."""
        path = self.config.get("progress_path")
        if not self.is_rank_zero or not path or (not force and time.monotonic() - self._progress_at < 1.0):
            return
        self._progress_at = time.monotonic()
        record = {"step": self.step, "steps": self.tc.steps, "loss": loss,
                  "eval_loss": self.last_eval.get("eval_loss_mean"), **self._throughput()}
        tmp = Path(f"{path}.tmp")
        try:  # a display aid: never a reason to stop training
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)  # a reader sees the whole record or the previous one
        except OSError:
            pass

    def _micro_batches(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """This step's draws, per micro-step: (task ids, example indices) of all ranks, and this rank's positions.

        The global stream of draws is the same on every rank. Draw g of a micro-step belongs to rank
        g % world_size; with ``group_by_length`` the step's draws are sorted by length first and cut into blocks
        (micro-step a, rank r: block a * world_size + r), so a micro-batch pads to similar lengths.
        """
        n, accum = self.global_micro_batch, self.tc.grad_accum
        if not self.tc.group_by_length:
            return [(*self.sampler.draw(n), np.arange(self.rank, n, self.world_size)) for _ in range(accum)]
        tasks, examples = self.sampler.draw(n * accum)
        order = np.argsort(self.flat_lengths[self.task_offsets[tasks] + examples], kind="stable")
        mine = np.arange(self.rank * self.tc.micro_batch_size, (self.rank + 1) * self.tc.micro_batch_size)
        return [(tasks[order[a * n: (a + 1) * n]], examples[order[a * n: (a + 1) * n]], mine) for a in range(accum)]

    def _throughput(self, prefix: str = "") -> dict[str, float]:
        secs = max(self.train_seconds, 1e-9)
        return {f"{prefix}tokens_per_s": self.tokens_seen / secs, f"{prefix}examples_per_s": self.examples_seen / secs}

    # ----------------------------------------------------------------------------------------------
    # evaluate, checkpoint, report

    def _evaluate_and_report(self, loss: float, lr: float, *, checkpoint: bool, final: bool) -> None:
        t0 = time.perf_counter()
        result = self._evaluate(self.eval_sets, self.task_names)
        # The selection metric (Tune's): the mean over the scored tasks only (tasks[*].score).
        result["eval_loss_scored"] = result.pop("loss_scored")
        self.last_eval = {"step": self.step, "loss": loss, **result}
        self.history.append(self.last_eval)
        metrics = {"step": self.step, "loss": loss, "lr": lr, "eval_loss_mean": result["eval_loss_mean"],
                   "eval_loss_scored": result["eval_loss_scored"],
                   "eval_accuracy_mean": result["eval_accuracy_mean"], **self._throughput()}
        for name in self.task_names:
            metrics[f"eval_loss/{name}"] = result["eval_loss_per_task"][name]
            metrics[f"eval_accuracy/{name}"] = result["eval_accuracy_per_task"][name]
        if self.wandb is not None:
            self.wandb.log({("eval/" + k if k.startswith("eval_") else k): v for k, v in metrics.items()
                            if k.startswith("eval")}, step=self.step)
        if self.is_rank_zero:
            print(f"step {self.step}: loss {loss:.4f}, eval loss {result['eval_loss_mean']:.4f}, "
                  f"eval accuracy {result['eval_accuracy_mean']:.3f} ({time.perf_counter() - t0:.1f}s); "
                  f"{self.train_seconds:.1f}s training so far", flush=True)
        if self._audit is not None:
            self._audit.flush()
        self._report(metrics, checkpoint=checkpoint, final=final)

    def _evaluate(self, sets: list, names: list[str]) -> dict[str, Any]:
        """``evaluate_model`` on every rank (ZeRO-3 gathers collectively), plus ``loss_scored``: the mean loss over
        the scored tasks (``tasks[*].score``) among ``names``, or over all of them if none is scored."""
        batch, synced = max(8, 2 * self.tc.micro_batch_size), self.tc.zero_stage == 3 and self.world_size > 1
        result = evaluate_model(self.engine.module, self.tokenizer, sets, names, rank=self.rank,
                                world_size=self.world_size, device=self.device, batch_size=batch, synced=synced)
        self.engine.train()
        keep = dict(zip(self.task_names, self.config.get("scored") or [True] * len(self.task_names)))
        scored = [n for n in names if keep[n]] or names
        result["loss_scored"] = float(np.mean([result["eval_loss_per_task"][n] for n in scored]))
        return result

    def _report(self, metrics: dict[str, Any], *, checkpoint: bool, final: bool) -> None:
        import ray.train

        if not checkpoint:
            ray.train.report(metrics)
            return
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="taskpgm-ckpt-") as d:
            self.engine.save_checkpoint(d, tag=DS_TAG)  # [5] every rank writes its own shards
            torch.save(_get_rng_state(), Path(d) / f"rng-rank{self.rank}.pt")
            if self.is_rank_zero:
                state = {"step": self.step, "sampler": self.sampler.state_dict(),
                         "tokens_per_task": self.tokens_per_task.tolist(), "loss_curve": self.loss_curve,
                         "history": self.history}
                (Path(d) / STATE_FILE).write_text(json.dumps(state))
            if final:
                self._save_pretrained(Path(d) / HF_MODEL_DIR)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))  # [5]
        if self.is_rank_zero:
            print(f"checkpoint at step {self.step}: {time.perf_counter() - t0:.1f}s", flush=True)

    def _save_pretrained(self, path: Path) -> None:
        """The whole model on rank 0 (gathered from every rank's partition under ZeRO-3), via save_pretrained."""
        if self.tc.zero_stage == 3:
            state_dict = self.engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
        else:
            state_dict = self.engine.module.state_dict() if self.is_rank_zero else None
        if self.is_rank_zero:
            self.engine.module.save_pretrained(str(path), state_dict=state_dict)

    def _summary(self) -> dict[str, Any]:
        ev = self.last_eval
        return {
            "format": "taskpgm-train/1",
            "steps": self.step,
            "weight_unit": self.tc.weight_unit,
            "weights": dict(zip(self.task_names, map(float, self.config["weights"]))),
            "draw_probabilities": dict(zip(self.task_names, map(float, self.sampler.probabilities))),
            "samples_per_task": self.sampler.samples_per_task(),
            "tokens_per_task": dict(zip(self.task_names, map(int, self.tokens_per_task))),
            "eval_split": self.config.get("eval_split", "eval"),
            "eval_loss_per_task": ev.get("eval_loss_per_task", {}),
            "eval_accuracy_per_task": ev.get("eval_accuracy_per_task", {}),
            "eval_loss_mean": ev.get("eval_loss_mean"),
            "eval_loss_scored": ev.get("eval_loss_scored"),
            "eval_accuracy_mean": ev.get("eval_accuracy_mean"),
            **self._test_summary(),
            "throughput": {**self._throughput(), "train_seconds": self.train_seconds},
            "removed_tasks": self.sampler.removed_tasks(),
            "sampler_events": self.sampler.events,
            "world_size": self.world_size,
            "zero_stage": self.tc.zero_stage,
            "loss_curve": self.loss_curve,
            "history": self.history,
        }

    def _test_summary(self) -> dict[str, Any]:
        """The final model on the test split (``final_test``): per task, mean, and the mean over scored tasks."""
        if not (t := self.test_result):
            return {}
        return {"test_loss_per_task": t["eval_loss_per_task"], "test_accuracy_per_task": t["eval_accuracy_per_task"],
                "test_loss_mean": t["eval_loss_mean"], "test_loss_scored": t["loss_scored"],
                "test_accuracy_mean": t["eval_accuracy_mean"]}

    def cleanup(self) -> None:
        self._exit.close()


# --------------------------------------------------------------------------------------------------
# evaluation (also used on a reloaded model, with world_size 1)


@torch.no_grad()
def evaluate_model(model: Any, tokenizer: Any, eval_sets: list[list[tuple[tuple[list[int], list[int]], str]]],
                   task_names: list[str], *, rank: int = 0, world_size: int = 1, device: Any = "cpu",
                   batch_size: int = 16, synced: bool = False) -> dict[str, Any]:
    """Per-task mean token NLL of the responses, and exact-match accuracy of greedy decoding.

    Examples are sharded across ranks (rank r takes every world_size-th) and padded so every rank runs the
    same number of forward passes, as ZeRO-3 needs; ``synced`` keeps greedy decoding in lock-step
    (``generate(synced_gpus=True)``). Sums are all-reduced, so every rank returns the same result.

    ``eval_sets[i]`` is task i's list of ``((ids, labels), response_text)``.
    """
    was_training = model.training
    model.eval()
    items = [(ti, enc, resp) for ti, es in enumerate(eval_sets) for enc, resp in es]
    mine = items[rank::world_size]
    per_rank = -(-len(items) // world_size)
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))  # padding rows count for nothing
    mine = mine + [items[0]] * (per_rank - len(mine))
    # Greedy decoding budget: the longest eval response (+ EOS), capped; the same on every rank.
    max_new = min(MAX_NEW_TOKENS, max((sum(1 for x in lab if x != IGNORE_INDEX) for _, (_, lab), _ in items),
                                      default=1))
    sums = torch.zeros(len(task_names), 4, dtype=torch.float64)  # nll sum, response tokens, correct, examples
    pad = tokenizer.pad_token_id
    for start in range(0, per_rank, batch_size):
        chunk, w = mine[start: start + batch_size], weights[start: start + batch_size]
        # 1. loss: right-padded teacher forcing
        batch = {k: v.to(device) for k, v in collate([enc for _, enc, _ in chunk], pad).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll = -(logp * mask).sum(1).double().cpu()
        ntok = mask.sum(1).double().cpu()
        # 2. exact match: greedy decoding from the left-padded prompts
        prompts = [[t for t, lab in zip(ids, labs) if lab == IGNORE_INDEX] for _, (ids, labs), _ in chunk]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for j, (ti, _, resp) in enumerate(chunk):
            correct = float(texts[j].strip() == resp.strip())
            sums[ti] += torch.tensor([nll[j] * w[j], ntok[j] * w[j], correct * w[j], w[j]], dtype=torch.float64)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(reduced := sums.to(device))
        sums = reduced.cpu()
    if was_training:
        model.train()
    s = sums.numpy()  # a set without examples (a task without test beside evaluation sets): NaN, not in the means
    has = s[:, 3] > 0
    loss = np.where(has, s[:, 0] / np.maximum(s[:, 1], 1.0), np.nan)
    acc = np.where(has, s[:, 2] / np.maximum(s[:, 3], 1.0), np.nan)
    return {"eval_loss_per_task": dict(zip(task_names, map(float, loss))),
            "eval_accuracy_per_task": dict(zip(task_names, map(float, acc))),
            "eval_loss_mean": float(loss[has].mean()) if has.any() else float("nan"),
            "eval_accuracy_mean": float(acc[has].mean()) if has.any() else float("nan")}


# --------------------------------------------------------------------------------------------------
# helpers


def _every(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _get_rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
