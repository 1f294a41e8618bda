"""The dilution attack measured from stored activations: one forward per dilution cell serves every gate.

A gate's decision on a row is `rho > tau` with rho from the row's stored SAE activations
(`ActivationStore.row_scores`), exactly the guard's own decision (`dsg sweep` checks it on every re-scored
question), so the attack success of many gates (scores, windows, thresholds, feature sets) over the whole grid of
`evaluation.dilution.dilution_grid` costs one statistics-pass forward per cell. Used by `dsg sweep --dilution`
and `dsg results`.
"""

from __future__ import annotations

from ..data.rows import Rows
from ..errors import DSGError
from ..evaluation.dilution import DILUTIONS, attack_success, dilution_grid, filler_tokens


def activation_store(model, tokenizer, statistics, rows, desc: str, device: str = "cpu"):
    """The statistics pass's SAE activations of `rows` (a `Rows`) at the guard's layer, counted as the guard counts."""
    import torch

    from ..analysis.stats import collect
    from .build import counted_exclusions, sae_encoder

    encode = sae_encoder(statistics.sae_spec, statistics.sae_state, device)
    with torch.no_grad():
        return collect(
            model,
            statistics.layer,
            encode,
            rows,
            batch_size=16,
            desc=desc,
            ignore_token_ids=counted_exclusions(model, tokenizer),
            device=device,
        )


def fired(store, guardrail: dict):
    """The guardrail's per-row decisions from stored activations (exactly the guard's, see `dsg sweep`)."""
    rho = store.guardrail_scores(guardrail)
    return (rho > guardrail["threshold"]).numpy()


def dilution_attack(
    model,
    tokenizer,
    statistics,
    prompts,
    filler_texts,
    guardrails: dict,
    *,
    seed: int = 0,
    device: str = "cpu",
    filler_name: str = "WikiText",
    more_fillers: dict | None = None,
) -> dict:
    """Per guardrail variant and dilution cell (placement x factor, `dilution_grid`): attack success (see
    `attack_success`). `filler_texts` fills the untagged cells ("1x", "suffix 1x", ...); `more_fillers`
    {tag: (name, texts)} repeats the grid with other fillers, keys tagged ("mmlu 1x", "mmlu suffix 1x", ...).
    Each filler's offsets (one per prompt, the same in every cell) come from one generator seeded `seed`."""
    import numpy as np

    from ..evaluation.report import PLACEMENTS
    from ..evaluation.scoring import padding_id

    bos = tokenizer.bos_token_id
    prompt_ids = tokenizer(prompts)["input_ids"]
    fillers = {"": (filler_name, filler_texts), **(more_fillers or {})}
    rng = np.random.default_rng(seed)
    undiluted = activation_store(
        model, tokenizer, statistics, Rows.from_sequences(prompt_ids, padding_id(tokenizer)), "dilution: none", device
    )
    out = {name: {} for name in guardrails}
    base_fired = {name: fired(undiluted, g) for name, g in guardrails.items()}
    cells = []
    for tag, (name, texts) in fillers.items():
        filler = filler_tokens(tokenizer, texts)
        if not filler:
            raise DSGError(f"dilution: the filler {name} has no tokens")
        offsets = rng.integers(0, len(filler), size=len(prompts))
        for placement, factor, key, seqs in dilution_grid(
            prompt_ids, filler, offsets, bos, PLACEMENTS, DILUTIONS, tag
        ):
            store = activation_store(
                model,
                tokenizer,
                statistics,
                Rows.from_sequences(seqs, padding_id(tokenizer)),
                f"dilution: {name} {key}",
                device,
            )
            cells.append({"filler": tag, "placement": placement, "factor": factor, "key": key})
            for g_name, g in guardrails.items():
                out[g_name][key] = attack_success(base_fired[g_name], fired(store, g))
    for name in guardrails:
        out[name]["undiluted_trigger_rate"] = float(base_fired[name].mean())
    return {
        "n": len(prompts),
        "factors": list(DILUTIONS),
        "placements": list(PLACEMENTS),
        "fillers": [{"tag": tag, "name": name} for tag, (name, _) in fillers.items()],
        "cells": cells,
        "by_guardrail": out,
    }


def worst_attack(block: dict, by: dict) -> float | None:
    """The highest attack success over every cell (filler, placement, factor) of one guardrail's entry `by` of a
    `dilution_attack` block (None when no cell could be measured: nothing fired undiluted)."""
    from ..evaluation.report import cell_key

    fillers = block.get("fillers") or [{"tag": ""}]
    placements = block.get("placements") or ["prefix"]
    cells = [
        by[cell_key(p, k, f["tag"])]["attack_success"] for f in fillers for p in placements for k in block["factors"]
    ]
    known = [c for c in cells if c is not None]
    return max(known) if known else None
