"""The guardrails' decisions on a list of prompts, measured through the DSG model itself.

A guardrail's decision depends only on the blocks up to its layer, so the forward stops right after
the deepest guarded block: the same guard code as in deployment, at a fraction of a full forward.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def guard_decisions(
    model, tokenizer, texts: list[str], *, batch_size: int = 16, desc: str = "decisions", stop_early: bool = True
) -> dict[str, dict[str, torch.Tensor]]:
    """Per guardrail name: {"rho": [n] float64, "fired": [n] bool}, in the order of `texts`.

    Prompts are tokenized as they are (the tokenizer's own special tokens, no chat template), left
    padded, and sorted by length so that batches carry little padding.
    """
    from .forward import StopForward, decoder_block, stopping_after

    if not texts:
        return {
            guard.name: {"rho": torch.zeros(0, dtype=torch.float64), "fired": torch.zeros(0, dtype=torch.bool)}
            for guard in model.guards
        }
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    results = {
        guard.name: {
            "rho": torch.zeros(len(texts), dtype=torch.float64),
            "fired": torch.zeros(len(texts), dtype=torch.bool),
        }
        for guard in model.guards
    }
    stop = contextlib.nullcontext()
    if stop_early and len(model.guards):
        stop = stopping_after(decoder_block(model.model, max(g.layer for g in model.guards)), capture=False)
    try:
        with stop:
            for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
                index = order[start : start + batch_size]
                enc = tokenizer([texts[i] for i in index], return_tensors="pt", padding=True).to(model.device)
                with model.record_guardrails() as records:
                    try:
                        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
                    except StopForward:
                        pass
                for record in records:
                    results[record["guardrail"]]["rho"][index] = record["rho"].cpu()
                    results[record["guardrail"]]["fired"][index] = record["fired"].cpu()
    finally:  # leave the caller's tokenizer as it was
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
    return results
