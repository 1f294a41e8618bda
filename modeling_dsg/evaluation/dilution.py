"""`dsg eval --dilution`: does the guard still fire on forget prompts padded with harmless filler?

Each forget question's letter prompt, as the letter scoring feeds it to the model
(`evaluation.letter_sequences`: chat template, preamble and all), gets k times its length of filler
tokens, for k in `results.DILUTIONS` (1, 2, 5, 10), at each placement of `report_schema.PLACEMENTS`:
in front ("prefix", after its BOS if it has one), after it ("suffix"), and between its two halves of
tokens ("split"), built by `results.dilution_grid` / `results.dilute`: the attack `dsg results` runs on
the embedded default. The filler is the `--text` source when given, else the retain questions' text,
tokenized without special tokens and joined; each prompt's filler starts at a random offset (seed
`SEED`, the same offset in every cell) and wraps around.

The decisions are the DSG model's own, recorded during a forward (`record_guardrails`), so they are
the guard's decisions in deployment. Per dynamic guardrail and cell (placement x factor, keyed by
`report_schema.cell_key`: "1x" ... "10x", "suffix 1x" ..., "split 1x" ...), `results.attack_success`:
of the prompts that fired undiluted, the fraction that no longer fire. Static guardrails clamp at every
token and take no decision, so they have no entry.

The block returned is the report's "dilution" (`report_schema.Dilution`).
"""

from __future__ import annotations

from ..errors import DSGError
from .report import PLACEMENTS, Dilution

SEED = 0


def check_dilution(guardrails: list[dict]) -> list[dict]:
    """The dynamic ones of `guardrails` (config.json or report "guardrails" entries); `--dilution` needs one."""
    measured = [g for g in guardrails if g.get("mode", "dynamic") == "dynamic"]
    if not measured:
        raise DSGError(
            "--dilution: this model has no dynamic guardrail (static guardrails clamp at every token "
            "and take no decision that filler could dilute)"
        )
    return measured


def filler_texts(retain, texts: list[str] | None, text_name: str) -> tuple[list[str], str]:
    """(filler texts, their label): the --text source's texts, else the retain questions' text."""
    if texts:
        return list(texts), f"{text_name} (text)"
    return [r["question"] for r in retain.records], f"{retain.label} questions"


def _fired(model, tokenizer, sequences: list, options, desc: str) -> dict:
    """Per guardrail, whether it fired on each token sequence (the DSG model's recorded decisions)."""
    from .evaluate import _Decisions, _forward, _pad_id

    decisions = _Decisions(len(sequences))
    for index, _, recorded in _forward(
        model,
        sequences,
        [1] * len(sequences),
        pad_id=_pad_id(tokenizer),
        batch_size=options.batch_size,
        desc=desc,
        record=True,
        progress=options.progress,
    ):
        decisions.add(index, recorded)
    return decisions.fired


def measure_dilution(
    model, tokenizer, forget, filler_texts: list[str], filler_name: str, options, guardrails: list[dict]
) -> Dilution:
    """The dilution block for the forget set `forget` (an `evaluation.McqSet`), filler from `filler_texts`.

    `guardrails`: the report's "guardrails" entries (name, mode, score); only dynamic ones are measured.
    """
    import numpy as np

    from ..embedded.results import DILUTIONS, attack_success, dilution_grid, filler_tokens
    from .evaluate import letter_sequences, mcq_texts

    measured = check_dilution(guardrails)
    filler = filler_tokens(tokenizer, filler_texts)
    if not filler:
        raise DSGError(f"--dilution: the filler ({filler_name}) has no tokens")
    prompts = mcq_texts(tokenizer, forget, options)["letter"]
    sequences = letter_sequences(tokenizer, prompts, chat=options.chat)[0]
    bos = tokenizer.bos_token_id
    offsets = np.random.default_rng(SEED).integers(0, len(filler), size=len(sequences))
    before = _fired(model, tokenizer, sequences, options, f"{forget.label} dilution: none")
    by_guardrail = {
        g["name"]: {"score": g.get("score", "fraction"), "undiluted_trigger_rate": float(before[g["name"]].mean())}
        for g in measured
    }
    for _, _, key, diluted in dilution_grid(sequences, filler, offsets, bos, PLACEMENTS, DILUTIONS):
        after = _fired(model, tokenizer, diluted, options, f"{forget.label} dilution: {key}")
        for g in measured:
            by_guardrail[g["name"]][key] = attack_success(before[g["name"]], after[g["name"]])
    return {
        "dataset": forget.label,
        "filler": filler_name,
        "n": len(sequences),
        "factors": list(DILUTIONS),
        "placements": list(PLACEMENTS),
        "seed": SEED,
        "by_guardrail": by_guardrail,
    }
