"""Fluency of fired answers: what a user sees when a guardrail fires.

Greedy generations on held-out forget prompts *that fire* and on retain prompts, from the DSG model and
from the base model (the same instance inside `guardrails_disabled()`), measured with the base model:

    NLL per token     the base model's negative log-likelihood of the generated tokens given the prompt,
                      summed over every generation and divided by their token count (micro average); the
                      generated tokens run up to and including the first end-of-sequence token. The base's
                      own greedy answers are the reference (low by construction: greedy picks the argmax);
                      `nll_added` = DSG - base. Gibberish scores high, a fluent refusal or a fluent wrong
                      answer low.
    repetition        on the lower-cased words of the decoded text (`words`, runs of letters/digits):
                      repeated 3-gram share = 1 - distinct 3-grams / 3-grams (0: no 3-gram occurs twice;
                      "too pace too pace too pace" -> 0.5) and distinct-2 = distinct 2-grams / 2-grams
                      (1: no repeated pair); each the mean over the generations that have such n-grams.
    answer leak       whether the correct choice's text appears in the generation (both normalised by
                      `normalize`: lower case, every run of non-alphanumerics one space, matched on word
                      boundaries); "only" also requires that no other choice's text appears (an answer that
                      lists every choice names the correct one without choosing it).

Prompts are the lm-eval letter prompt (question, "A. .." lines, "Answer:"), sent as a user turn through the
chat template when `chat` (the default, as `dsg demo` does) and tokenized as they are otherwise.
A forget prompt "fires" when any guardrail fires on the prompt itself (one forward); forget prompts are
scanned in order and the first `n` that fire are kept. Retain prompts are the first `n`, fired or not.

`measure_fluency` returns the report block `dsg eval --fluency N` writes under "fluency". Over several
processes (`dsg eval` under torchrun) the forwards and the generations are split by batch
(`scoring.batched_forward`, `greedy_generate`) and gathered, so every process holds one process's block.
"""

from __future__ import annotations

import re
import time

from .. import distributed
from ..data.mcq import chat_wrap, letter_prompt
from .markdown import fmt_fixed, md_excerpt
from .scoring import Decisions, all_rows, as_base, batched_forward, model_device, padding_id, target_logprobs

NGRAM_REPEAT = 3  # n of the repeated n-gram share
NGRAM_DISTINCT = 2  # n of distinct-n
SUMMARY_KEYS = (
    "nll_per_token",
    "repeated_3gram_share",
    "distinct_2",
    "answer_leak_rate",
    "answer_only_leak_rate",
    "mean_new_tokens",
)

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


# ------------------------------------------------------------------------------------ text metrics
def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: "Too pace, too-pace!" -> ["too", "pace", "too", "pace"]."""
    return _WORD.findall(text.lower())


def normalize(text: str) -> str:
    """Lower case, each run of non-alphanumerics one space, stripped: "The  Golgi-body." -> "the golgi body"."""
    return " ".join(words(text))


def ngrams(tokens, n: int) -> list[tuple]:
    tokens = list(tokens)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_share(tokens, n: int = NGRAM_REPEAT) -> float | None:
    """1 - distinct n-grams / n-grams: the share of n-grams that repeat an earlier one (None: no n-gram)."""
    grams = ngrams(tokens, n)
    return None if not grams else 1.0 - len(set(grams)) / len(grams)


def distinct_n(tokens, n: int = NGRAM_DISTINCT) -> float | None:
    """Distinct n-grams / n-grams (None: no n-gram)."""
    grams = ngrams(tokens, n)
    return None if not grams else len(set(grams)) / len(grams)


def answer_leaked(generation: str, answer: str) -> bool:
    """Does `answer`'s text appear in `generation` (normalised, on word boundaries)? An empty answer never does."""
    a = normalize(answer)
    return bool(a) and f" {a} " in f" {normalize(generation)} "


def answer_only_leaked(generation: str, choices, answer: int) -> bool:
    """The correct choice's text appears and no other choice's text does."""
    return answer_leaked(generation, choices[answer]) and not any(
        answer_leaked(generation, c)
        for j, c in enumerate(choices)
        if j != answer and normalize(c) != normalize(choices[answer])
    )


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def text_metrics(texts, records=None) -> dict:
    """Repetition (and, with `records` {choices, answer} per text, answer leak) over decoded generations."""
    tokens = [words(t) for t in texts]
    out = {
        "repeated_3gram_share": _mean(repeated_ngram_share(t, NGRAM_REPEAT) for t in tokens),
        "distinct_2": _mean(distinct_n(t, NGRAM_DISTINCT) for t in tokens),
    }
    if records is not None:
        leaks = [answer_leaked(t, r["choices"][r["answer"]]) for t, r in zip(texts, records)]
        only = [answer_only_leaked(t, r["choices"], r["answer"]) for t, r in zip(texts, records)]
        out["answer_leak_rate"] = sum(leaks) / len(leaks) if leaks else None
        out["answer_only_leak_rate"] = sum(only) / len(only) if only else None
        out["answer_leaked"] = leaks
    return out


def nll_summary(sums, counts) -> dict:
    """Micro-averaged NLL per token over generations (summed NLL [n], token counts [n]), and the
    per-generation mean."""
    total = float(sum(counts))
    per = [s / c for s, c in zip(sums, counts) if c]
    return {
        "nll_per_token": float(sum(sums)) / total if total else None,
        "nll_per_generation_mean": _mean(per),
        "n_tokens": int(total),
    }


# ------------------------------------------------------------------------------------ generation
def prompt_ids(tokenizer, records, *, chat: bool = True) -> list[list[int]]:
    """The letter prompts' token ids (chat-wrapped, no added special tokens; or as they are, with them)."""
    texts = [letter_prompt(r) for r in records]
    if chat:
        texts = [chat_wrap(tokenizer, t) for t in texts]
    return [list(x) for x in tokenizer(texts, add_special_tokens=not chat)["input_ids"]]


def _eos_ids(model, tokenizer) -> set:
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _left_padded(sequences, pad_id: int):
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def prompt_fired(model, tokenizer, sequences, *, batch_size: int = 8) -> list[bool]:
    """Per prompt: did any guardrail fire on it (one forward, the guard's own decision)?"""
    fired = [False] * len(sequences)
    if not getattr(model, "guards", None):
        return fired
    decisions = Decisions(len(sequences))
    with all_rows(decisions, what="fluency: which prompts fire"):  # over several processes: every process's rows
        for index, _, recorded in batched_forward(
            model,
            sequences,
            [1] * len(sequences),
            pad_id=padding_id(tokenizer),
            batch_size=batch_size,
            desc="fluency: which prompts fire",
            record=True,
            progress=False,
        ):
            decisions.add(index, recorded)
    for per_row in decisions.fired.values():
        fired = [f or bool(g) for f, g in zip(fired, per_row)]
    return fired


def first_fired(model, tokenizer, records, n: int, *, chat: bool = True, batch_size: int = 8) -> tuple[list, int]:
    """The indices of the first `n` records (in order) whose letter prompt makes a guardrail fire, scanned in
    chunks, and how many records that took (the last kept one's position + 1, or all when fewer fire)."""
    keep, scanned = [], 0
    while len(keep) < n and scanned < len(records):
        chunk = list(range(scanned, min(len(records), scanned + max(n - len(keep), batch_size))))
        seqs = prompt_ids(tokenizer, [records[i] for i in chunk], chat=chat)
        for i, f in zip(chunk, prompt_fired(model, tokenizer, seqs, batch_size=batch_size)):
            if f and len(keep) < n:
                keep.append(i)
        scanned = chunk[-1] + 1
    return keep, (keep[-1] + 1) if len(keep) == n else len(records)


def greedy_generate(model, tokenizer, sequences, *, max_new_tokens: int = 32, batch_size: int = 8):
    """Greedy continuations of token sequences (left padded, in batches). Returns (generated ids per row, cut
    after the first end-of-sequence token, which is kept; fired per row: any guardrail fired at any point)."""
    import torch

    eos = _eos_ids(model, tokenizer)
    pad = padding_id(tokenizer)
    device = model_device(model)
    starts = list(range(0, len(sequences), batch_size))
    pieces, error = [], None
    try:
        for start in distributed.shard(starts):  # over several processes: this process's batches (r, r + W, ...)
            chunk = sequences[start : start + batch_size]
            ids, mask = _left_padded(chunk, pad)
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    return_dict_in_generate=True,
                )
            rows = []
            for row in out.sequences[:, ids.shape[1] :].tolist():
                cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
                rows.append(row[:cut])
            decisions = getattr(out, "guardrail_decisions", None) or {}
            row_fired = [False] * len(chunk)
            for d in decisions.values():
                for b, f in enumerate(d["fired"].tolist()):
                    row_fired[b] = row_fired[b] or bool(f)
            pieces.append((rows, row_fired))
    except Exception as err:  # every process learns of it (a lone failure would leave the others waiting)
        error = err
    distributed.raise_if_any_failed(error, "fluency: greedy generation")
    generated, fired = [], []
    for rows, row_fired in distributed.gather_shards(pieces, len(starts)):  # in batch order, as one process
        generated.extend(rows)
        fired.extend(row_fired)
    return generated, fired


def base_nll(model, tokenizer, sequences, generated, *, batch_size: int = 8):
    """The base model's summed NLL of each generation given its prompt, and its token count."""
    with as_base(model):
        sums, counts, _ = target_logprobs(
            model,
            tokenizer,
            [(s + g)[:-1] for s, g in zip(sequences, generated)],
            generated,
            batch_size=batch_size,
            desc="fluency: base NLL",
            progress=False,
        )
    return [-float(x) for x in sums], [int(c) for c in counts]


def generation_block(model, tokenizer, sequences, generated, records, *, batch_size: int = 8) -> dict:
    """NLL under the base, repetition and answer leak of `generated` (token ids per prompt)."""
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    sums, counts = base_nll(model, tokenizer, sequences, generated, batch_size=batch_size)
    out = {**nll_summary(sums, counts), **text_metrics(texts, records)}
    out["mean_new_tokens"] = _mean(counts)
    out["texts"] = texts
    out["nll"] = [s / c if c else None for s, c in zip(sums, counts)]
    return out


def measure_fluency(
    model,
    tokenizer,
    forget_records,
    retain_records,
    n: int,
    *,
    max_new_tokens: int = 32,
    chat: bool = True,
    batch_size: int = 8,
    n_examples: int = 3,
    forget_label: str = "forget",
    retain_label: str = "retain",
    base_cache: dict | None = None,
    forget_fire: bool = False,
) -> dict:
    """The fluency block (module docstring): {"settings", "sets": {label: {...}}}.

    Per set: "n", "scanned" (forget: prompts looked at to find `n` that fire), "fired_on_prompt", "base" and
    "dsg" ({nll_per_token, repeated_3gram_share, distinct_2, answer_leak_rate, answer_only_leak_rate,
    mean_new_tokens, ...}), "nll_added" (DSG - base), "fired_in_generation", "identical_to_base" (rows whose
    DSG generation equals the base's), "examples" (the first `n_examples`: prompt, answer, base, dsg, fired).
    `base_cache` (a dict, filled on first use) keeps the base model's generations between calls on the same
    prompts, so that a sweep over edits generates the base answers once. `forget_fire=True`: the forget records
    are known to fire (chosen by an earlier call; decisions do not depend on the edit), so the first `n` are
    kept without the scan ("scanned" is then None)."""
    from ..errors import DSGError

    if n < 1:
        raise DSGError(f"--fluency must be at least 1, got {n}")
    if max_new_tokens < 1:
        raise DSGError(f"the fluency generations need at least 1 new token, got {max_new_tokens}")
    if chat and not getattr(tokenizer, "chat_template", None):
        chat = False  # a tokenizer without a chat template: the prompts as they are
    start = time.perf_counter()
    model.eval()
    sets = {}
    for role, label, records in (("forget", forget_label, forget_records), ("retain", retain_label, retain_records)):
        records = list(records)
        if role == "forget" and forget_fire:
            keep, scanned = list(range(min(n, len(records)))), None
            fired = {i: True for i in keep}
        elif role == "forget":
            keep, scanned = first_fired(model, tokenizer, records, n, chat=chat, batch_size=batch_size)
            fired = {i: True for i in keep}
        else:
            keep = list(range(min(n, len(records))))
            scanned = len(keep)
            fired = (
                dict(
                    zip(
                        keep,
                        prompt_fired(
                            model,
                            tokenizer,
                            prompt_ids(tokenizer, records[: len(keep)], chat=chat),
                            batch_size=batch_size,
                        ),
                    )
                )
                if keep
                else {}
            )
        recs = [records[i] for i in keep]
        seqs_k = prompt_ids(tokenizer, recs, chat=chat) if recs else []
        entry = {
            "role": role,
            "n": len(keep),
            "scanned": scanned,
            "fired_on_prompt": sum(fired[i] for i in keep) / len(keep) if keep else None,
        }
        if not keep:
            sets[label] = entry
            continue
        key = (role, tuple(map(tuple, seqs_k)), max_new_tokens)
        if base_cache is not None and key in base_cache:
            base = base_cache[key]
        else:
            with as_base(model):
                base_ids, _ = greedy_generate(
                    model, tokenizer, seqs_k, max_new_tokens=max_new_tokens, batch_size=batch_size
                )
            base = {
                "ids": base_ids,
                **generation_block(model, tokenizer, seqs_k, base_ids, recs, batch_size=batch_size),
            }
            if base_cache is not None:
                base_cache[key] = base
        dsg_ids, gen_fired = greedy_generate(
            model, tokenizer, seqs_k, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        dsg = generation_block(model, tokenizer, seqs_k, dsg_ids, recs, batch_size=batch_size)
        entry.update(
            {
                "base": {k: v for k, v in base.items() if k != "ids"},
                "dsg": dsg,
                "nll_added": None
                if dsg["nll_per_token"] is None or base["nll_per_token"] is None
                else dsg["nll_per_token"] - base["nll_per_token"],
                "fired_in_generation": sum(gen_fired) / len(gen_fired),
                "identical_to_base": sum(a == b for a, b in zip(dsg_ids, base["ids"])) / len(keep),
                "examples": [
                    {
                        "question": r["question"],
                        "answer": r["choices"][r["answer"]],
                        "base": base["texts"][j],
                        "dsg": dsg["texts"][j],
                        "fired": bool(gen_fired[j]),
                    }
                    for j, r in enumerate(recs[:n_examples])
                ],
            }
        )
        sets[label] = entry
    return {
        "settings": {
            "n": n,
            "max_new_tokens": max_new_tokens,
            "chat": chat,
            "decoding": "greedy",
            "prompt": "lm-eval letter prompt" + (" as a chat user turn" if chat else ""),
            "repeat_n": NGRAM_REPEAT,
            "distinct_n": NGRAM_DISTINCT,
        },
        "sets": sets,
        "seconds": time.perf_counter() - start,
    }


def summary_lines(block: dict) -> list[str]:
    """The fluency block as Markdown lines (a table and the examples)."""
    s = block["settings"]
    lines = [
        "## Fluency of generated answers",
        "",
        f"Greedy generations ({s['max_new_tokens']} new tokens, {s['prompt']}) on forget prompts that fire and on "
        "retain prompts. NLL: the base model's per-token NLL of the generated text (lower: more fluent); the "
        "base column is the base model's own answers. Repetition on words: repeated 3-gram share (lower is "
        "better), distinct-2 (higher is better). Leak: the correct choice's text appears in the answer.",
        "",
        "| set | n | fired | model | NLL/token ↓ | repeated 3-grams ↓ | distinct-2 ↑ | answer leak | only the answer "
        "| new tokens |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, e in block["sets"].items():
        if "base" not in e:
            lines.append(f"| {md_excerpt(label)} | 0 | | (no prompt fired) | | | | | | |")
            continue
        for who in ("base", "dsg"):
            m = e[who]
            fired = fmt_fixed(e["fired_in_generation"], 2) if who == "dsg" else ""
            lines.append(
                f"| {md_excerpt(label)} | {e['n']} | {fired} | {'base' if who == 'base' else 'DSG'} | "
                f"{fmt_fixed(m['nll_per_token'])} | {fmt_fixed(m['repeated_3gram_share'])} | "
                f"{fmt_fixed(m['distinct_2'])} | {fmt_fixed(m['answer_leak_rate'], 2)} | "
                f"{fmt_fixed(m['answer_only_leak_rate'], 2)} | {fmt_fixed(m['mean_new_tokens'], 1)} |"
            )
    for label, e in block["sets"].items():
        if e.get("examples"):
            lines += ["", f"Examples ({md_excerpt(label)}):", "", "| question | answer | base | DSG |"]
            lines.append("|---|---|---|---|")
            for x in e["examples"]:
                lines.append(
                    f"| {md_excerpt(x['question'], 100)} | {md_excerpt(x['answer'], 40)} | "
                    f"{md_excerpt(x['base'])} | {md_excerpt(x['dsg'])}{' (fired)' if x['fired'] else ''} |"
                )
    return lines
