"""Tiny model forward/backward and the offline tokenizer."""

from __future__ import annotations

import torch

from taskpgm_ray.config import ModelConfig
from taskpgm_ray.models import (
    IGNORE_INDEX,
    build_model,
    build_tokenizer,
    collate,
    encode_example,
    ensure_run_tokenizer,
    load_tokenizer,
    response_logprobs,
)


def test_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer(ModelConfig())
    text = "reverse: abc = cba\nünïcode ✓ 12+30"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    path = ensure_run_tokenizer(ModelConfig(), tmp_path)
    again = load_tokenizer(path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids and len(again) == len(tok)


def test_encode_scores_response_only_and_truncates_prompt():
    tok = build_tokenizer(ModelConfig())
    ids, labels = encode_example(tok, "p" * 10, " ab", max_length=64)
    n_resp = len(" ab") + 1  # bytes + eos
    assert labels[:-n_resp] == [IGNORE_INDEX] * (len(ids) - n_resp) and labels[-1] == tok.eos_token_id
    ids, labels = encode_example(tok, "p" * 100, " ab", max_length=16)
    assert len(ids) == 16 and sum(x != IGNORE_INDEX for x in labels) == n_resp


def test_tiny_model_forward_backward_and_loglik():
    cfg = ModelConfig()
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok)
    batch = collate([encode_example(tok, "sort: cba =", " abc", 32), encode_example(tok, "x", " y", 32)],
                    tok.pad_token_id)
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the HF loss is the mean token NLL over response tokens: our per-example sums must agree
    ll = response_logprobs(out.logits.detach(), batch["labels"])
    n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert torch.allclose(-ll.sum() / n_tokens, out.loss.detach(), atol=1e-5)


def test_tiny_model_is_seeded():
    cfg = ModelConfig()
    tok = build_tokenizer(cfg)
    a, b = build_model(cfg, tok), build_model(cfg, tok)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
