"""A proxy model apart from the target: config defaults, cache keys, tokenizers, and a pipeline run (probes,
estimate, train on a real local Ray cluster) whose proxy is a GPT-2 with its own BPE tokenizer while the
target is a tiny Llama with the byte tokenizer; the run directory follows CONTRACT.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from taskpgm_ray.config import TEST_CONFIG, ConfigError, config_from_dict
from taskpgm_ray.distributed.probes import probe_dir
from taskpgm_ray.distributed.scoring import scoring_settings
from taskpgm_ray.models import build_byte_tokenizer, ensure_proxy_tokenizer
from taskpgm_ray.pipeline import Pipeline

TASKS = ["sort", "add", "noise_a"]


def make_config(out, **overrides):
    data = yaml.safe_load(TEST_CONFIG.read_text())
    base = {"output_dir": str(out), "synthetic.include": TASKS, "model.name": "tiny", "train.steps": 20,
            "tracking.wandb": "disabled"}
    return config_from_dict(data, overrides={**base, **overrides})


def save_gpt2_proxy(out: Path, texts: list[str]) -> Path:
    """A random-init GPT-2 with a byte-level BPE tokenizer trained here (320 symbols), saved as a local checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------------------------------
# config, keys, tokenizers (no Ray)


def test_proxy_model_defaults_to_the_target_and_inherits_the_fields_it_leaves_out(tmp_path):
    cfg = make_config(tmp_path)
    assert cfg.proxy_model is None and cfg.proxy is cfg.model
    cfg = make_config(tmp_path, **{"proxy_model.tiny.hidden_size": 32, "proxy_model.tiny.num_heads": 2})
    assert cfg.proxy.name == "tiny" and cfg.proxy.max_length == cfg.model.max_length == 48
    assert cfg.proxy.tiny.hidden_size == 32 and cfg.model.tiny.hidden_size == 64
    assert cfg.proxy.tiny.num_layers == 2  # a given `tiny` section is whole: its other fields are the defaults
    again = config_from_dict(cfg.to_dict())  # the run directory's config.yaml reads back the same
    assert again.proxy == cfg.proxy and again.model == cfg.model


def test_proxy_model_is_validated_like_model(tmp_path):
    with pytest.raises(ConfigError, match=r"proxy_model.tiny.num_heads: hidden_size 30 is not divisible by 4; "
                                          r"proxy_model.max_length: must be >= 8, got 4$"):
        make_config(tmp_path, **{"proxy_model.tiny.hidden_size": 30, "proxy_model.max_length": 4})
    with pytest.raises(ConfigError, match=r"proxy_model.name: '/nowhere/gpt2' is neither 'tiny', a builtin model"):
        make_config(tmp_path, **{"proxy_model.name": "/nowhere/gpt2"})
    with pytest.raises(ConfigError, match=r"proxy_model.nmae: unknown key \(did you mean 'name'\?\)"):
        make_config(tmp_path, **{"proxy_model.nmae": "tiny"})


def test_probe_scoring_and_stage_keys_follow_the_proxy_not_the_target(tmp_path):
    from taskpgm_ray.tasks import load_tasks

    same = make_config(tmp_path)
    explicit = make_config(tmp_path, **{"proxy_model.name": "tiny"})  # the target, spelled out: the same proxy
    proxy = make_config(tmp_path, **{"proxy_model.tiny.seed": 1})
    target = make_config(tmp_path, **{"model.tiny.seed": 1, "proxy_model": dataclasses.asdict(same.model)})
    tasks = load_tasks(same)
    task = tasks[0]
    keys = {}
    for name, cfg in (("same", same), ("explicit", explicit), ("proxy", proxy), ("target", target)):
        p = Pipeline(cfg)
        p._tasks = tasks
        keys[name] = (probe_dir(cfg, task).name, json.dumps(scoring_settings(cfg), sort_keys=True),
                      p.probes_key(), p.estimate_key())
    assert keys["same"] == keys["explicit"] == keys["target"]  # the target model changes none of them
    assert all(a != b for a, b in zip(keys["same"], keys["proxy"]))  # the proxy model changes every one


def test_probe_keys_see_the_proxy_weights(tmp_path):
    from taskpgm_ray.tasks import load_tasks

    path = save_gpt2_proxy(tmp_path / "gpt2", ["sort: cba = abc", "add: 1+2 = 3"])
    cfg = make_config(tmp_path / "run", **{"proxy_model.name": str(path), "proxy_model.tokenizer": str(path)})
    task = load_tasks(cfg)[0]
    before, settings = probe_dir(cfg, task), scoring_settings(cfg)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(path))  # new weights, same config: a re-trained proxy model
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.add_(0.5)
    model.save_pretrained(str(path))
    assert probe_dir(cfg, task) != before and scoring_settings(cfg)["weights"] != settings["weights"]


def test_the_proxy_tokenizer_is_saved_apart_only_when_it_differs(tmp_path):
    path = save_gpt2_proxy(tmp_path / "gpt2", ["sort: cba = abc"])
    assert ensure_proxy_tokenizer(make_config(tmp_path), tmp_path / "a") == tmp_path / "a" / "tokenizer"
    cfg = make_config(tmp_path, **{"proxy_model.name": str(path), "proxy_model.tokenizer": str(path)})
    saved = ensure_proxy_tokenizer(cfg, tmp_path / "b")
    assert saved == tmp_path / "b" / "proxy_tokenizer" and not (tmp_path / "b" / "tokenizer").exists()
    from taskpgm_ray.models import load_tokenizer

    assert len(load_tokenizer(saved)) == len(load_tokenizer(path)) != len(build_byte_tokenizer())


# --------------------------------------------------------------------------------------------------
# the pipeline with a GPT-2 proxy (BPE tokenizer) and a tiny Llama target (byte tokenizer)


@pytest.fixture(scope="module")
def proxy_run(ray_cluster, tmp_path_factory):
    from taskpgm_ray.tasks import load_tasks

    root = tmp_path_factory.mktemp("proxy")
    out = root / "run"
    plain = make_config(out)
    texts = [s for t in load_tasks(plain) for e in t.train for s in (e.prompt, e.response)]
    gpt2 = save_gpt2_proxy(root / "gpt2", texts)
    cfg = make_config(out, **{
        "proxy_model.name": str(gpt2), "proxy_model.tokenizer": str(gpt2),  # max_length: the target's
        "probes.steps": 4, "probes.batch_size": 8, "estimation.num_actors": 1, "estimation.bootstrap": 10,
        "tune.enabled": False, "train.num_workers": 1, "train.steps": 3, "train.micro_batch_size": 4,
        "train.eval_every": 0, "train.checkpoint_every": 0, "train.warmup_steps": 1})
    timings = Pipeline(cfg).run(until="train")
    assert [s for s, status, _ in timings] == ["tasks", "probes", "estimate", "select", "train"]
    return cfg, out, gpt2


@pytest.mark.ray
@pytest.mark.slow
def test_proxy_and_target_with_different_architectures_and_tokenizers(proxy_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taskpgm_ray.models import collate, encode_example, load_tokenizer, response_logprobs
    from taskpgm_ray.tasks import load_tasks

    cfg, out, gpt2 = proxy_run
    tasks = load_tasks(cfg)
    # two tokenizers in the run: the target's (byte) and the proxy's (BPE, another vocabulary)
    target_tok, proxy_tok = load_tokenizer(out / "tokenizer"), load_tokenizer(out / "proxy_tokenizer")
    assert len(target_tok) == len(build_byte_tokenizer()) and len(proxy_tok) == len(load_tokenizer(gpt2)) == 320
    # the proxies are LoRA adapters on the GPT-2, on its attention layers
    for t in tasks:
        meta = json.loads((probe_dir(cfg, t) / "probe.json").read_text())
        assert meta["target_modules"] == ["c_attn", "attn.c_proj"]
    # likelihoods.npz per CONTRACT.md, and its numbers are the GPT-2 proxies' under the proxy tokenizer
    with np.load(out / "likelihoods.npz") as f:
        assert [str(x) for x in f["tasks"]] == [t.name for t in tasks]
        loglik, count = f["loglik_sum"], f["count"]
    assert loglik.shape == (3, 3) and loglik.dtype == np.float64 and np.all(np.isfinite(loglik)) and np.all(loglik < 0)
    assert count.tolist() == [len(t.probe) for t in tasks]
    i, j = 0, 1
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2), str(probe_dir(cfg, tasks[i]))).eval()
    batch = collate([encode_example(proxy_tok, e.prompt, e.response, cfg.proxy.max_length) for e in tasks[j].probe],
                    proxy_tok.pad_token_id)
    with torch.inference_mode():
        direct = response_logprobs(net(**batch).logits, batch["labels"]).double().sum().item()
    assert loglik[i, j] == pytest.approx(direct, rel=1e-5)
    # mixture.json per CONTRACT.md
    mixture = json.loads((out / "mixture.json").read_text())
    assert mixture["format"] == "taskpgm-mixture/1" and set(mixture["weights"]) == set(TASKS)
    assert all(w >= 0 for w in mixture["weights"].values()) and sum(mixture["weights"].values()) == pytest.approx(1)
    assert mixture["method"] == "taskpgm" and mixture["affinity"] in ("pmi", "jsd")
    # the checkpoint is the target: a Llama with the byte tokenizer, loadable with from_pretrained
    ckpt = out / "train" / "checkpoint"
    model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok) == len(target_tok)
    summary = json.loads((out / "train" / "summary.json").read_text())
    for key in ("samples_per_task", "tokens_per_task", "eval_loss_per_task", "eval_loss_mean", "throughput"):
        assert key in summary, key
    assert set(summary["eval_loss_per_task"]) == set(TASKS) and np.isfinite(summary["eval_loss_mean"])
    # a re-run finds every stage done under the same keys
    timings = Pipeline(cfg).run(until="train")
    assert {status for _, status, _ in timings} == {"cached"}
