"""Tiny random models, tokenizers and guardrails for fast tests (no network, no shared files)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from modeling_dsg import DSGConfig, DSGForCausalLM

PAD, BOS, EOS = 0, 1, 2
VOCAB = 259  # 3 specials + 256 byte symbols
HIDDEN = 32
LAYERS = 4

_COMMON = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
FAMILIES = {
    "llama": lambda: LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **_COMMON,
    ),
    "gemma2": lambda: Gemma2Config(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=16,
        max_position_embeddings=256,
        **_COMMON,
    ),
    "gpt2": lambda: GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=256, **_COMMON),
    "qwen2": lambda: Qwen2Config(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **_COMMON,
    ),
    "mistral": lambda: MistralConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=None,
        **_COMMON,
    ),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (any text encodes) that prepends <s>, with <pad> and </s>."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_base(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    model.generation_config.pad_token_id = PAD
    return model


def guardrail(
    arch: str = "jumprelu",
    *,
    name: str = "topic",
    layer: int = 1,
    d_sae: int = 64,
    features=(3, 7, 11, 20, 33),
    threshold: float = 0.3,
    clamp: float = 8.0,
    mode: str = "dynamic",
    slim: bool = False,
    d_in: int = HIDDEN,
    **sae_options,
) -> dict:
    sae = dict(architecture=arch, d_in=d_in, d_sae=d_sae, slim=slim, **sae_options)
    if arch == "topk":
        sae.setdefault("k", 8)
    return dict(name=name, layer=layer, features=list(features), threshold=threshold, clamp=clamp, mode=mode, sae=sae)


@torch.no_grad()
def sample_hidden(base, layer: int, n_rows: int = 16, length: int = 24, seed: int = 123) -> torch.Tensor:
    """Hidden states [n, d] at the output of block `layer` for random token rows (BOS excluded)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n_rows, length), generator=gen)
    hidden = base(ids, output_hidden_states=True).hidden_states[layer + 1]
    return hidden.reshape(-1, hidden.shape[-1]).float()


@torch.no_grad()
def randomize_sae(guard, hidden: torch.Tensor, active_rate: float = 0.12, seed: int = 0):
    """Random SAE weights whose selected features are each active on about `active_rate` of tokens.

    Biases are set from quantiles of the pre-activations on sample hidden states, so the firing rates
    are known whatever the base model's activation scale.
    """
    gen = torch.Generator().manual_seed(seed)
    sae = guard.sae
    for name, tensor in sae.named_parameters():
        if name in ("W_enc", "W_dec"):
            tensor.copy_(torch.randn(tensor.shape, generator=gen) / tensor.shape[0] ** 0.5)
        elif name == "b_dec":
            tensor.copy_(0.01 * torch.randn(tensor.shape, generator=gen))
        else:
            tensor.zero_()
    x = sae.preprocess(hidden)[0]
    cols = guard.feature_index if not sae.slim or not sae.per_feature_encoder else torch.arange(len(guard.features))
    pre = x @ sae.W_enc  # [n, n_enc]
    cut = -torch.quantile(pre, 1 - active_rate, dim=0)  # bias that makes pre + b > 0 on active_rate of tokens
    arch = type(sae).__name__
    if arch == "GatedSAE":
        sae.b_gate.copy_(cut)
        sae.b_mag.copy_(torch.full_like(sae.b_mag, 0.5))
    elif arch == "TopKSAE":
        sae.b_enc.fill_(-1e3)  # only the selected features can enter the top k
        sae.b_enc[cols] = cut[cols]
    else:
        sae.b_enc.copy_(cut)
    if hasattr(sae, "threshold"):
        sae.threshold.fill_(1e-4)
    if hasattr(sae, "dec_norm"):
        sae.dec_norm.copy_(torch.ones_like(sae.dec_norm))


def tiny_dsg(family: str = "llama", guardrails=None, seed: int = 0, active_rate: float = 0.12):
    """(DSG model, an independent copy of the base model) with random SAEs of known firing rates."""
    base = tiny_base(family, seed)
    reference = copy.deepcopy(base)
    guardrails = [guardrail()] if guardrails is None else guardrails
    config = DSGConfig(text_config=base.config.to_dict(), guardrails=guardrails)
    model = DSGForCausalLM(config, base_model=base).eval()
    model.generation_config = copy.deepcopy(base.generation_config)
    for i, guard in enumerate(model.guards):
        randomize_sae(guard, sample_hidden(reference, guard.layer), active_rate, seed + i)
    return model, reference


def save_tiny_dsg(path, family: str = "llama", guardrails=None, seed: int = 0, **save_kwargs) -> Path:
    """Save a tiny DSG model and its tokenizer to `path` (a folder that loads with trust_remote_code)."""
    model, _ = tiny_dsg(family, guardrails, seed)
    path = Path(path)
    model.save_pretrained(path, **save_kwargs)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_tiny_dsg(path, **kwargs) -> Path:
    """Alias kept for other test modules: a saved tiny Llama DSG folder with tokenizer."""
    return save_tiny_dsg(path, **kwargs)
