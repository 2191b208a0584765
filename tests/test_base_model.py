"""The shipped pretrained base of the synthetic world: loadable as a user's checkpoint, small, reproducible
from its committed script and seed, and pretrained on a corpus that holds none of the suite's templates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taskpgm_ray.config import ModelConfig
from taskpgm_ray.models import BUILTIN_MODELS, build_model, build_tokenizer, model_fingerprint, response_logprobs
from taskpgm_ray.tasks.corpus import AUX, GenericCorpus, template_fragments
from taskpgm_ray.tasks.synthetic import SKILLS, load_spec

ROOT = Path(__file__).resolve().parent.parent
BASE = BUILTIN_MODELS["synthetic-base"]


def test_the_base_loads_with_from_pretrained_and_is_small():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name: p.stat().st_size for p in BASE.iterdir()}
    assert sum(files.values()) <= 20 * 2**20 and "model.safetensors" in files
    model = AutoModelForCausalLM.from_pretrained(str(BASE))
    tok = AutoTokenizer.from_pretrained(str(BASE))
    assert model.config.vocab_size == len(tok) == len(build_tokenizer(ModelConfig()))
    provenance = json.loads((BASE / "pretrain.json").read_text())
    assert provenance["script"] == "scripts/pretrain_base.py" and provenance["args"]["seed"] == 0
    assert provenance["parameters"] == sum(p.numel() for p in model.parameters())
    # the config name resolves to the same weights, and the cache keys see them
    same = build_model(ModelConfig(name="synthetic-base"), tok)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    assert model_fingerprint(ModelConfig(name="synthetic-base")) not in ("", "synthetic-base")


def test_the_base_learned_to_copy_from_context_not_the_suite_skills():
    """Generic ability (looking back and copying) is there; a suite skill such as reversal is not."""
    tok = build_tokenizer(ModelConfig())
    model = build_model(ModelConfig(name="synthetic-base"), tok).eval()

    def nll(prompt, response):
        ids = [tok.bos_token_id] + tok(prompt + response, add_special_tokens=False)["input_ids"]
        n = len(tok(response, add_special_tokens=False)["input_ids"])
        labels = [-100] * (len(ids) - n) + ids[-n:]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits
        return -float(response_logprobs(logits, torch.tensor([labels]))[0]) / n

    words = ["bdfhk", "gaeclj", "kkbdl", "hfjab"]
    copy = sum(nll(f"qzv {w} |", f" {w}") for w in words)
    reverse = sum(nll(f"qzv {w} |", f" {w[::-1]}") for w in words)
    assert copy < 0.5 * reverse


def test_corpus_holds_no_template_and_no_suite_skill_but_copy():
    spec = load_spec()
    fragments = template_fragments(t.template for t in spec.tasks)
    assert "reverse:" in fragments and "backwards" in fragments and "=" not in fragments
    corpus = GenericCorpus(0, fragments)
    text = "\n".join(corpus.document() for _ in range(3000))
    for t in spec.tasks:  # the words of every template (reverse, copy, map, ...) never appear as words
        for frag in template_fragments([t.template]):
            assert f" {frag} " not in f" {text} ".replace("\n", " "), frag
    assert set(AUX) & set(SKILLS) == {"copy"}
    assert GenericCorpus(0, fragments).document() == GenericCorpus(0, fragments).document()


@pytest.mark.slow
def test_pretraining_is_reproducible_from_the_seed(tmp_path):
    """Two short runs of the committed script with the same seed write identical weights."""
    from safetensors.torch import load_file

    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_base.py"), "--out", str(out), "--steps", "3",
                        "--batch-size", "4", "--threads", "1"], check=True, capture_output=True)
        outs.append(load_file(str(out / "model.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
