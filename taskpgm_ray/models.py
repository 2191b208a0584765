"""Model and tokenizer factory, and the one place where (prompt, response) becomes token ids.

Production configs name a hub id or local path; test mode builds a tiny Llama-style model from a config
and a byte-level tokenizer, both without any download. Every stage uses a tokenizer saved in the run: the
target model's under ``<output_dir>/tokenizer``, and the proxy model's under ``<output_dir>/proxy_tokenizer``
when it has a different one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskpgm_ray.config import Config, ModelConfig
from taskpgm_ray.errors import BadInput

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label for prompt and padding tokens: no loss, no log-likelihood
# Models shipped with the package, by name: the small pretrained base of the synthetic world
# (reproduced by scripts/pretrain_base.py).
BUILTIN_MODELS = {"synthetic-base": Path(__file__).resolve().parent / "assets" / "synthetic-base"}


def resolve_model_name(name: str) -> str:
    """A builtin model's directory, else ``name`` unchanged (a hub id or a local path)."""
    return str(BUILTIN_MODELS[name]) if name in BUILTIN_MODELS else name


def model_fingerprint(cfg: ModelConfig) -> str:
    """What identifies the weights behind ``cfg`` for cache keys: the config for 'tiny', file contents for a
    local checkpoint (so re-pretraining the builtin base invalidates every adapter and score), else the name."""
    import hashlib

    if cfg.name == "tiny":
        return ""
    path = Path(resolve_model_name(cfg.name))
    if not path.is_dir():
        return cfg.name
    h = hashlib.sha256()
    for f in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.stat().st_size < 64 << 20 else str(f.stat().st_mtime_ns).encode())
    return h.hexdigest()[:16]


def build_byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 byte symbols + <pad>, <bos>, <eos>) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: every byte is its own token, so no merges and no word splitting surprises.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def build_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The configured tokenizer: ``byte`` (offline) or ``AutoTokenizer.from_pretrained(name)``."""
    if cfg.tokenizer == "byte":
        return build_byte_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a run (``<output_dir>/tokenizer``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def ensure_run_tokenizer(cfg: ModelConfig, output_dir: str | os.PathLike, name: str = "tokenizer") -> Path:
    """Save the configured tokenizer under ``output_dir/name`` once, so every stage shares it."""
    path = Path(output_dir) / name
    if not (path / "tokenizer_config.json").exists():
        tmp = path.with_name(f"{name}.tmp{os.getpid()}")
        build_tokenizer(cfg).save_pretrained(str(tmp))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; theirs is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_proxy_tokenizer(cfg: Config, output_dir: str | os.PathLike) -> Path:
    """The proxy model's saved tokenizer: the run's ``tokenizer`` when proxy and target share one, else
    ``output_dir/proxy_tokenizer``."""
    name = "tokenizer" if cfg.proxy.tokenizer == cfg.model.tokenizer else "proxy_tokenizer"
    return ensure_run_tokenizer(cfg.proxy, output_dir, name=name)


def _dtype(cfg: ModelConfig, on_gpu: bool) -> torch.dtype:
    import torch

    if cfg.dtype == "auto":
        # bf16 where the GPU computes in it natively (Ampere and later; emulation is slower than fp32).
        bf16 = on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, cfg.dtype)


def _tiny_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The LlamaConfig of ``cfg.tiny``, sized to the tokenizer."""
    from transformers import LlamaConfig

    t = cfg.tiny
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=max(cfg.max_length, 64),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, on_gpu: bool = False) -> PreTrainedModel:
    """The base causal LM: a tiny Llama built from ``cfg.tiny`` (seeded, offline), or ``from_pretrained`` of a
    builtin model (``BUILTIN_MODELS``), a local path or a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = _dtype(cfg, on_gpu)
    if cfg.name != "tiny":
        return AutoModelForCausalLM.from_pretrained(resolve_model_name(cfg.name), dtype=dtype)
    config = _tiny_config(cfg, tokenizer)
    # Seed a private generator so building the model never disturbs the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny.seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Keep each layer's input only and recompute the rest in backward (non-reentrant: works under ZeRO-3)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def model_skeleton(cfg: ModelConfig) -> PreTrainedModel:
    """The model's module tree on the meta device (its config only: no weights, no memory), for checks on the
    driver such as the LoRA targets."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.name == "tiny":
        config = _tiny_config(cfg, build_tokenizer(cfg))
    else:
        config = AutoConfig.from_pretrained(resolve_model_name(cfg.name))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int, *,
                   chat_template: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of ``<bos> prompt response <eos>`` and labels that score the response tokens only.

    With ``chat_template``, the ids are the tokenizer's chat template around a user turn (the prompt) and the
    assistant's turn (the response); the labels score the assistant's turn only (see :func:`chat_parts`).
    Truncation keeps the response: the prompt is cut from the left when the pair is too long.
    """
    if chat_template:
        p, r = chat_parts(tokenizer, prompt, response)
        bos: list[int] = []  # the template writes its own
    else:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    r = r[: max_length - len(bos) - 1]
    p = p[max(0, len(p) - (max_length - len(bos) - len(r))):]
    ids = bos + p + r
    labels = [IGNORE_INDEX] * (len(bos) + len(p)) + r
    return ids, labels


def chat_parts(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted prompt (through the assistant's header) and of the assistant's turn.

    The two parts are the template's text for [user] + generation prompt, and the rest of its text for
    [user, assistant], tokenized apart: the prompt ids are exactly what generation starts from. The assistant's
    turn ends with EOS (appended when the template does not write it), so generation learns to stop.

    Raises:
        ValueError: the tokenizer has no chat template, or its template does not render the conversation as
            the prompt followed by the answer.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput(f"model.chat_template: true but the tokenizer {tokenizer.name_or_path or ''!r} has no chat "
                       f"template; set model.chat_template: false or use a tokenizer that has one")
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise BadInput("model.chat_template: the tokenizer's chat template does not write the conversation as its "
                       "prompt (with the generation prompt) followed by the answer, so the answer's tokens cannot "
                       "be told apart; set model.chat_template: false")
    p = tokenizer(head, add_special_tokens=False)["input_ids"]
    r = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in r:
        r.append(tokenizer.eos_token_id)
    return p, r


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (ids, labels) into ``input_ids``, ``attention_mask``, ``labels`` tensors (B, T)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def response_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example sum of log p(y_t | x, y_<t) over response tokens; logits (B, T, V), labels (B, T) -> (B,)."""
    import torch

    shift_logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    logp = torch.log_softmax(shift_logits, dim=-1)
    tok = logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (tok * mask).sum(dim=1)
