"""The model families users bring: LoRA targets per architecture, chat templates with exact response-only
masking, precision and memory options; then a compatibility matrix on small random-initialised checkpoints of
five families (Llama, Qwen2, Mistral, GPT-2, Phi-3), each saved to a local directory and loaded with
from_pretrained as a user's checkpoint would be: LoRA probe, scoring, and a fine-tune under ZeRO-2 and ZeRO-3
(real Ray Train + DeepSpeed, 2 CPU workers, all ten fine-tunes in one Ray Train run), save, reload, and the
reloaded model reproduces the reported eval loss."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from taskpgm_ray.config import TEST_CONFIG, ModelConfig, config_from_dict
from taskpgm_ray.distributed.probes import LORA_TARGETS, lora_targets
from taskpgm_ray.models import (
    IGNORE_INDEX,
    build_byte_tokenizer,
    build_model,
    collate,
    enable_activation_checkpointing,
    encode_example,
)

# Small configs of five families (transformers' own classes, random init); sizes fit a 2-core CPU.
FAMILIES = {
    "llama": ("LlamaConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": None}),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}),  # Conv1D, tied embeddings
    "phi3": ("Phi3Config", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2}),  # fused qkv_proj
}
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPECTED_TARGETS = {"llama": QKVO, "qwen2": QKVO, "mistral": QKVO, "gpt2": ["c_attn", "attn.c_proj"],
                    "phi3": ["qkv_proj", "o_proj"]}
TASKS = ["sort", "add"]  # the suite's two smallest tasks (25 and 20 training examples at scale 0.25)
STEPS = 3


def family_config(family: str, tokenizer):
    """The family's transformers config, sized to ``tokenizer``."""
    import transformers

    cls, kwargs = FAMILIES[family]
    return getattr(transformers, cls)(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      **kwargs)


def save_checkpoint(family: str, out: Path, tokenizer) -> Path:
    """A random-init checkpoint of ``family`` with its tokenizer, as a user's local model directory."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(family_config(family, tokenizer))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------------------------------
# LoRA targets (model skeletons on the meta device: no weights)


def _skeleton(family: str):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(family_config(family, build_byte_tokenizer()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_targets_are_detected_per_family(family):
    model = _skeleton(family)
    assert lora_targets(model, None) == EXPECTED_TARGETS[family]
    assert lora_targets(model, ["all-linear"]) == "all-linear"
    assert model.config.model_type in LORA_TARGETS


def test_an_unlisted_family_gets_every_linear_layer_but_the_output():
    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"mix_in": torch.nn.Linear(4, 8),
                                                                   "mix_out": torch.nn.Linear(8, 4)}) for _ in range(2))
            self.lm_head = torch.nn.Linear(4, 10)

    assert lora_targets(Mixer(), None) == ["mix_in", "mix_out"]


def test_an_architecture_without_targets_is_refused_in_one_line_naming_its_modules():
    class Convolutional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="conv-lm")
            self.embed = torch.nn.Embedding(10, 4)
            self.layers = torch.nn.ModuleList(torch.nn.Conv1d(4, 4, 3) for _ in range(3))
            self.lm_head = torch.nn.Linear(4, 10)

    with pytest.raises(ValueError, match=r"^probes.target_modules: cannot detect LoRA targets for Convolutional "
                                         r"\(model_type 'conv-lm'\): no linear layer besides the output layer; "
                                         r"modules found: embed \(Embedding\), layers.\* \(Conv1d\), "
                                         r"lm_head \(Linear\); name the modules") as info:
        lora_targets(Convolutional(), None)
    assert "\n" not in str(info.value)


def test_a_target_override_that_matches_nothing_names_the_linear_layers():
    with pytest.raises(ValueError, match=r"^probes.target_modules: no module of GPT2LMHeadModel \(model_type 'gpt2'\) "
                                         r"matches 'q_proj', 'v_proj'; its linear layers: "
                                         r"transformer.h.\*.attn.c_attn \(Conv1D\), transformer.h.\*.attn.c_proj "
                                         r"\(Conv1D\), transformer.h.\*.mlp.c_fc \(Conv1D\)") as info:
        lora_targets(_skeleton("gpt2"), ["q_proj", "v_proj"])
    assert "\n" not in str(info.value)
    assert lora_targets(_skeleton("gpt2"), ["c_attn"]) == ["c_attn"]


def test_probe_command_refuses_bad_targets_before_any_ray_task(tmp_path, monkeypatch):
    import taskpgm_ray.distributed.cluster as cluster
    from taskpgm_ray.distributed.probes import probe_command

    monkeypatch.setattr(cluster, "init_ray", lambda **_: pytest.fail("Ray started before the targets were checked"))
    cfg = config_from_dict(yaml.safe_load(TEST_CONFIG.read_text()), overrides={
        "output_dir": str(tmp_path), "synthetic.include": TASKS, "model.name": "tiny",
        "probes.target_modules": ["c_attn"]})
    with pytest.raises(ValueError, match=r"no module of LlamaForCausalLM \(model_type 'llama'\) matches 'c_attn'"):
        probe_command(cfg)


# --------------------------------------------------------------------------------------------------
# chat templates: response-only loss masking, token by token

# A template in the style of the common chat models: a header per turn, an end-of-turn marker.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture
def chat_tokenizer():
    tok = build_byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    return tok


def test_chat_template_scores_exactly_the_assistant_turn_token_by_token(chat_tokenizer):
    tok = chat_tokenizer
    ids, labels = encode_example(tok, "sort: cba =", " abc", max_length=128, chat_template=True)
    special = {t: tok.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|end|>")}
    byte = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = [tok.bos_token_id, special["<|user|>"], *byte("\nsort: cba ="), special["<|end|>"], *byte("\n"),
              special["<|assistant|>"], *byte("\n")]
    answer = [*byte(" abc"), special["<|end|>"], *byte("\n"), tok.eos_token_id]
    assert ids == prompt + answer
    for i, (token, label) in enumerate(zip(ids, labels)):
        assert label == (IGNORE_INDEX if i < len(prompt) else token), (i, tok.convert_ids_to_tokens(token))
    # the prompt part is exactly what generation starts from
    head = tok.apply_chat_template([{"role": "user", "content": "sort: cba ="}], tokenize=False,
                                   add_generation_prompt=True)
    assert ids[: len(prompt)] == tok(head, add_special_tokens=False)["input_ids"]
    # truncation keeps the whole answer and cuts the prompt from the left
    short_ids, short_labels = encode_example(tok, "sort: cba =", " abc", max_length=len(answer) + 3, chat_template=True)
    assert short_ids == prompt[-3:] + answer and short_labels == [IGNORE_INDEX] * 3 + answer
    # without the switch nothing changes: <bos> prompt response <eos>
    assert encode_example(tok, "q", " a", 32) == encode_example(build_byte_tokenizer(), "q", " a", 32)


def test_chat_template_loss_is_the_mean_over_the_assistant_turn(chat_tokenizer):
    from taskpgm_ray.models import response_logprobs

    tok = chat_tokenizer
    model = build_model(ModelConfig(), tok)
    batch = collate([encode_example(tok, "q: x", " y", 64, chat_template=True),
                     encode_example(tok, "copy: ab =", " ab", 64, chat_template=True)], tok.pad_token_id)
    out = model(**batch)
    n_answer = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert n_answer == (len(" y") + 3) + (len(" ab") + 3)  # bytes + <|end|> + newline + eos
    assert torch.allclose(-response_logprobs(out.logits, batch["labels"]).sum() / n_answer, out.loss, atol=1e-5)


def test_chat_template_errors_are_one_line(chat_tokenizer):
    with pytest.raises(ValueError, match=r"^model.chat_template: true but the tokenizer .* has no chat template"):
        encode_example(build_byte_tokenizer(), "q", " a", 32, chat_template=True)
    chat_tokenizer.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match=r"^model.chat_template: the tokenizer's chat template does not write"):
        encode_example(chat_tokenizer, "q", " a", 32, chat_template=True)


# --------------------------------------------------------------------------------------------------
# precision, gradient checkpointing, length-grouped batches


def test_precision_follows_the_model_dtype():
    from taskpgm_ray.models import _dtype
    from taskpgm_ray.train.deepspeed_config import with_precision

    assert _dtype(ModelConfig(), on_gpu=False) == torch.float32  # auto on CPU
    assert _dtype(ModelConfig(dtype="bfloat16"), on_gpu=False) == torch.bfloat16
    ds = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    assert with_precision(ds, torch.float32) == {"bf16": {"enabled": False}, "zero_optimization": {"stage": 3}}
    assert with_precision(ds, torch.bfloat16)["bf16"] == {"enabled": True}
    fp16 = with_precision(ds, torch.float16)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and not fp16["bf16"]["enabled"]
    assert "fp16" not in with_precision(fp16, torch.bfloat16)


def test_gradient_checkpointing_changes_memory_not_numbers():
    tok = build_byte_tokenizer()
    batch = collate([encode_example(tok, "sort: cba =", " abc", 32), encode_example(tok, "x", " yz", 32)],
                    tok.pad_token_id)
    grads = []
    for checkpointing in (False, True):
        model = build_model(ModelConfig(), tok).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        model(**batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def _step_batches(group_by_length: bool, rank: int, world_size: int = 2, accum: int = 2, micro: int = 3):
    """``MixtureFinetune._micro_batches`` on a stand-in recipe (no Ray): one step's draws for ``rank``."""
    from taskpgm_ray.train.recipe import MixtureFinetune
    from taskpgm_ray.train.sampler import MixtureSampler

    sizes = [40, 30]
    lengths = np.random.default_rng(0).integers(5, 60, size=sum(sizes))
    fake = types.SimpleNamespace(
        sampler=MixtureSampler(["a", "b"], sizes, [0.5, 0.5], seed=0), global_micro_batch=micro * world_size,
        tc=types.SimpleNamespace(grad_accum=accum, group_by_length=group_by_length, micro_batch_size=micro),
        rank=rank, world_size=world_size, flat_lengths=lengths, task_offsets=np.array([0, 40, 70]))
    return [(t[m], e[m], lengths[np.array([0, 40])[t[m]] + e[m]]) for t, e, m in MixtureFinetune._micro_batches(fake)]


def test_length_grouped_batches_hold_the_same_examples_with_less_padding():
    from taskpgm_ray.train.sampler import MixtureSampler

    stream = MixtureSampler(["a", "b"], [40, 30], [0.5, 0.5], seed=0)
    drawn = list(zip(*stream.draw(12)))
    plain = [_step_batches(False, r) for r in (0, 1)]
    grouped = [_step_batches(True, r) for r in (0, 1)]
    # as drawn: draw g of each micro-step goes to rank g % world_size
    assert [list(zip(t, e)) for t, e, _ in plain[0]] == [drawn[0:6:2], drawn[6:12:2]]
    # grouped: the same examples in the step, each rank a full micro-batch, micro-batches of similar lengths
    union = sorted((int(t), int(e)) for rank in grouped for tt, ee, _ in rank for t, e in zip(tt, ee))
    assert union == sorted((int(t), int(e)) for t, e in drawn)
    assert all(len(t) == 3 for rank in grouped for t, _, _ in rank)
    pad = lambda batches: sum(int(n.max() * len(n) - n.sum()) for rank in batches for _, _, n in rank)  # noqa: E731
    assert pad(grouped) < pad(plain)
    # sorted blocks in order: micro-step 0 (rank 0, rank 1), then micro-step 1 (rank 0, rank 1)
    blocks = [grouped[0][0][2], grouped[1][0][2], grouped[0][1][2], grouped[1][1][2]]
    assert all(a.max() <= b.min() for a, b in zip(blocks, blocks[1:]))


# --------------------------------------------------------------------------------------------------
# the compatibility matrix: probe, score, fine-tune under ZeRO-2 and ZeRO-3, save, reload


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: save_checkpoint(f, root / f, build_byte_tokenizer()) for f in FAMILIES}


def family_run_config(family: str, path: Path, out: Path, **overrides):
    data = yaml.safe_load(TEST_CONFIG.read_text())
    return config_from_dict(data, overrides={
        "output_dir": str(out), "synthetic.include": TASKS, "model.name": str(path), "model.tokenizer": str(path),
        "probes.steps": 4, "probes.batch_size": 4, "probes.lr": 3e-3, "probes.num_cpus": 1, "splits.max_eval": 4,
        "train.steps": STEPS, "train.micro_batch_size": 4, "train.eval_every": 0, "train.checkpoint_every": 0,
        "train.warmup_steps": 1, "tracking.wandb": "disabled", **overrides})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_probe_and_scoring_per_family(family, checkpoints, tmp_path):
    """The probe worker and the estimation actor, in this process (the same code the Ray tasks run)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taskpgm_ray.distributed.probes import train_probe
    from taskpgm_ray.distributed.scoring import BASE, EstimationActor, Proxy, make_shards, scoring_settings
    from taskpgm_ray.models import response_logprobs
    from taskpgm_ray.tasks import load_tasks

    cfg = family_run_config(family, checkpoints[family], tmp_path)
    task = load_tasks(cfg)[0]
    threads = torch.get_num_threads()
    try:
        meta = train_probe(task.name, [(e.prompt, e.response) for e in task.train], dataclasses.asdict(cfg.probes),
                           dataclasses.asdict(cfg.proxy), str(checkpoints[family]), str(tmp_path / "adapter"))
        assert meta["target_modules"] == EXPECTED_TARGETS[family] and meta["final_loss"] < meta["first_loss"]
        shard = make_shards([task], 8, scoring_settings(cfg))[0]
        actor = EstimationActor(dataclasses.asdict(cfg.proxy), str(checkpoints[family]),
                                [Proxy(task.name, "h", str(tmp_path / "adapter"))], batch_size=3, top_k=4)
        scores = actor.score(shard, ["h", BASE])
    finally:
        torch.set_num_threads(threads)
    # the actor's numbers are the adapter's log-likelihoods, computed here directly
    tok = AutoTokenizer.from_pretrained(checkpoints[family])
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoints[family]),
                                    str(tmp_path / "adapter")).eval()
    batch = collate([encode_example(tok, p, r, cfg.proxy.max_length) for p, r in shard.pairs], tok.pad_token_id)
    with torch.inference_mode():
        direct = response_logprobs(net(**batch).logits, batch["labels"]).double().numpy()
    np.testing.assert_allclose(scores["loglik"]["h"], direct, rtol=1e-4)
    assert np.all(np.isfinite(scores["loglik"][BASE])) and not np.allclose(scores["loglik"][BASE], direct)
    assert scores["topk"]["h"][0].shape[1] == 4


@pytest.fixture(scope="module")
def matrix(ray_cluster, checkpoints, tmp_path_factory):
    """Every family fine-tuned under ZeRO-2, then ZeRO-3 with gradient checkpointing and length-grouped batches,
    one after the other in ONE Ray Train run of 2 workers (one worker-group start for all ten)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from taskpgm_ray.distributed.cluster import worker_env
    from taskpgm_ray.tasks import load_tasks
    from taskpgm_ray.train import build_trainer

    root = tmp_path_factory.mktemp("matrix")
    runs, contexts = [], {}
    for family, path in checkpoints.items():
        for stage in (2, 3):
            name = f"{family}-zero{stage}"
            extra = {"train.gradient_checkpointing": True, "train.group_by_length": True} if stage == 3 else {}
            cfg = family_run_config(family, path, root / name, **{"train.zero_stage": stage, **extra})
            tasks = load_tasks(cfg)
            trainer = build_trainer(cfg, tasks, {"sort": 0.5, "add": 0.5}, run_dir=root / name, name=name)
            runs.append((name, trainer.train_loop_config))
            contexts[name] = (cfg, tasks)

    def run_all(config):
        import ray.train

        from taskpgm_ray.train.recipe import train_loop_per_worker

        # Within one Ray Train run get_checkpoint() returns the last reported checkpoint: each fine-tune here is a
        # fresh start, not a resume of the previous family's.
        ray.train.get_checkpoint = lambda: None
        return {name: train_loop_per_worker(loop_config) for name, loop_config in config["runs"]}

    result = TorchTrainer(
        run_all, train_loop_config={"runs": runs},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="matrix", storage_path=str(root / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             worker_runtime_env={"env_vars": worker_env()}),
    ).fit()
    summaries = result.return_value
    # each fine-tune reported one checkpoint (its final one, with the saved model), in run order
    assert len(result.best_checkpoints) == len(runs)
    saved = {name: ckpt for (name, _), (ckpt, _) in zip(runs, result.best_checkpoints)}
    return summaries, saved, contexts


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fine_tune_under_zero2_and_zero3_saves_a_model_that_reloads_and_scores_as_reported(family, matrix):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taskpgm_ray.train.recipe import HF_MODEL_DIR, evaluate_model

    summaries, saved, contexts = matrix
    for stage in (2, 3):
        name = f"{family}-zero{stage}"
        summary, (cfg, tasks) = summaries[name], contexts[name]
        assert summary["steps"] == STEPS and summary["zero_stage"] == stage and summary["world_size"] == 2
        assert np.all(np.isfinite(summary["loss_curve"]))
        with saved[name].as_directory() as d:
            model = AutoModelForCausalLM.from_pretrained(Path(d) / HF_MODEL_DIR)
            assert model.config.model_type == family
            tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
            sets = [[(encode_example(tok, e.prompt, e.response, cfg.model.max_length), e.response) for e in t.eval]
                    for t in tasks]
            again = evaluate_model(model, tok, sets, [t.name for t in tasks])
        assert again["eval_loss_mean"] == pytest.approx(summary["eval_loss_mean"], abs=1e-4), name
        assert again["eval_accuracy_per_task"] == summary["eval_accuracy_per_task"], name

