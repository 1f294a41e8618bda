"""What a user sees when a guardrail fires: every action and clamp value side by side on the same prompts.

`compare_edits` puts one guardrail, in turn, into each edit it can make when it fires:

    base       no guardrail (the model as it was)
    monitor    decide and record, edit nothing
    refuse     the refusal text, then end of sequence
    clamp:C    the selected features set to -C at the flagged tokens (the paper's edit; C = 500 is the paper's)

and measures each on held-out questions:

    forget / retain cloze p     per-token probability of the correct answer's text after "{question}\\nAnswer:"
                                (`dsg results`' metric), on the forget and retain question sets;
    fired cloze p               on the fired prompts themselves: P(correct choice's text | the letter prompt as
                                a chat user turn), per token, mean over the prompts of exp(mean log p);
    fluency                     `fluency.measure_fluency` on the first `n` forget prompts whose chat prompt fires
                                (the same prompts for every edit: a decision does not depend on the edit) and on
                                `n_retain` retain prompts: the base model's NLL per token of the greedy answers,
                                distinct-2, repeated 3-grams, answer leak; three examples per edit.

`pick_clamp` is the sweep's rule with a fluency floor (issue-style "forgets without breaking the text"): among the
clamp values whose retain cloze p is at least `retain_floor` of the base's and whose fired answers' NLL is at
most the base's own answers' NLL + `nll_bound` nats per token, the one with the lowest forget cloze p.
`plot_frontier` draws forgetting against fluency (and against retain) for every edit.
"""

from __future__ import annotations

import time

from ..runtime.configuration_dsg import DEFAULT_REFUSAL
from . import fluency
from .markdown import fmt_fixed, md_excerpt
from .plots import COLORS, new_figure, save_figure

SENSITIVITY = (0.25, 0.5, 1.0, 2.0, 4.0)  # fluency bounds (nats per token) whose pick is reported beside the pick


# ------------------------------------------------------------------------------------ edits
def parse_edit(edit: str) -> dict:
    """ "clamp:3" -> {"edit": "clamp:3", "action": "clamp", "clamp": 3.0}; "base", "monitor", "refuse" likewise."""
    if edit.startswith("clamp:"):
        clamp = float(edit.split(":", 1)[1])
        if not 0 < clamp < float("inf"):
            raise ValueError(f"a clamp must be a finite number > 0, got {edit!r}")
        return {"edit": f"clamp:{clamp:g}", "action": "clamp", "clamp": clamp}
    if edit in ("base", "monitor", "refuse"):
        return {"edit": edit, "action": edit, "clamp": None}
    raise ValueError(f"unknown edit {edit!r} (base, monitor, refuse or clamp:C)")


def edit_label(edit: str) -> str:
    """How an edit reads in a table: "clamp 3", "ablate (c=1e-06)" for a clamp near 0, else its name."""
    e = parse_edit(edit)
    if e["action"] != "clamp":
        return e["edit"]
    return f"ablate (c={e['clamp']:g})" if e["clamp"] < 1e-3 else f"clamp {e['clamp']:g}"


def edited(guardrail: dict, edit: str, tokenizer) -> dict | None:
    """`guardrail` with the action (and clamp) of `edit`; None for "base" (no guardrail)."""
    e = parse_edit(edit)
    if e["action"] == "base":
        return None
    g = {k: v for k, v in guardrail.items() if k not in ("refusal", "refusal_ids")}
    g["action"] = e["action"]
    if e["action"] == "clamp":
        g["clamp"] = e["clamp"]
    if e["action"] == "refuse":
        text = guardrail.get("refusal") or DEFAULT_REFUSAL
        g["refusal"] = text
        g["refusal_ids"] = list(guardrail.get("refusal_ids") or tokenizer(text, add_special_tokens=False)["input_ids"])
    return g


# ------------------------------------------------------------------------------------ measuring
def has_chat_template(tokenizer) -> bool:
    """Prompts go through the chat template when the tokenizer has one (as `fluency.measure_fluency` does)."""
    return bool(getattr(tokenizer, "chat_template", None))


def fired_cloze(model, tokenizer, records, *, batch_size: int = 8) -> float | None:
    """Mean over `records` of exp(mean log p) of the correct choice's text after the chat letter prompt."""
    import numpy as np

    from ..data.mcq import chat_wrap, letter_prompt
    from .scoring import continuation_logprobs

    if not records:
        return None
    chat = has_chat_template(tokenizer)
    contexts = [letter_prompt(r) for r in records]
    contexts = [chat_wrap(tokenizer, c) for c in contexts] if chat else contexts
    answers = [" " + r["choices"][r["answer"]] if not chat else r["choices"][r["answer"]] for r in records]
    sums, counts, _ = continuation_logprobs(
        model, tokenizer, contexts, answers, chat=chat, batch_size=batch_size, progress=False
    )
    return float(np.mean(np.exp(sums / np.maximum(counts, 1))))


def compare_edits(
    model,
    tokenizer,
    guardrail: dict,
    sae_state: dict,
    sets: dict,
    prompts: list,
    retain_prompts: list,
    edits,
    *,
    n: int = 20,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    n_examples: int = 3,
    progress: bool = True,
) -> dict:
    """Every edit of `edits` (see the module docstring) on the same prompts.

    `model` is a DSG model without a guardrail of `guardrail["name"]` (it is added and removed per edit);
    `sets` {"forget": McqSet, "retain": McqSet} are scored for cloze p; `prompts` are forget records scanned in
    order for `n` that fire; `retain_prompts` are retain records (all used). Returns {"n_fired", "scanned",
    "settings", "edits": {edit: {"label", "forget", "retain", "fired_cloze_p", "fluency", "seconds"}}}."""
    from tqdm.auto import tqdm

    from .evaluate import EvalOptions
    from .metrics import mcq_numbers
    from .scoring import score_set

    eo = EvalOptions(cloze="correct", known_filter=False, batch_size=batch_size, progress=False)
    monitor = model.add_guardrail(edited(guardrail, "monitor", tokenizer), sae_state)
    try:
        keep, scanned = fluency.first_fired(
            model, tokenizer, prompts, n, chat=has_chat_template(tokenizer), batch_size=batch_size
        )
        chosen = [prompts[i] for i in keep]
    finally:
        model.remove_guardrail(monitor.name)
    out = {
        "n_fired": len(chosen),
        "scanned": scanned,
        "settings": {"n": n, "max_new_tokens": max_new_tokens, "retain_prompts": len(retain_prompts)},
        "edits": {},
    }
    cache: dict = {}  # the base model's generations, made once
    for edit in tqdm(list(edits), desc="actions", unit="edit", disable=not progress):
        start = time.perf_counter()
        g = edited(guardrail, edit, tokenizer)
        if g is not None:
            model.add_guardrail(g, sae_state)
        try:
            scores = {role: score_set(model, tokenizer, s, eo, letters=False, tag=edit) for role, s in sets.items()}
            point = {role: mcq_numbers(scores[role], s.answers) for role, s in sets.items()}
            point["fired_cloze_p"] = fired_cloze(model, tokenizer, chosen, batch_size=batch_size)
            block = fluency.measure_fluency(
                model,
                tokenizer,
                chosen,
                retain_prompts,
                max(n, len(retain_prompts), 1),
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                n_examples=n_examples,
                base_cache=cache,
                forget_fire=True,
            )
        finally:
            if g is not None:
                model.remove_guardrail(g["name"])
        point["fluency"] = {label: summarize(e, "dsg") for label, e in block["sets"].items()}
        point["examples"] = [x["dsg"] for x in block["sets"]["forget"].get("examples", [])]
        point["identical_to_base"] = {label: e.get("identical_to_base") for label, e in block["sets"].items()}
        if "base_fluency" not in out:
            out["base_fluency"] = {label: summarize(e, "base") for label, e in block["sets"].items()}
            out["prompts"] = [
                {"question": x["question"], "answer": x["answer"], "base": x["base"]}
                for x in block["sets"]["forget"].get("examples", [])
            ]
        point["label"] = edit_label(edit)
        point["seconds"] = time.perf_counter() - start
        out["edits"][parse_edit(edit)["edit"]] = point
    return out


def summarize(entry: dict, who: str) -> dict | None:
    """One side ("base" or "dsg") of a fluency set's entry, without the per-generation lists."""
    if who not in entry:
        return None
    return {k: entry[who][k] for k in fluency.SUMMARY_KEYS} | {"n": entry["n"]}


# ------------------------------------------------------------------------------------ the pick
def fired_nll(point: dict) -> float | None:
    forget = point["fluency"].get("forget")
    return None if forget is None else forget["nll_per_token"]


def pick_clamp(
    result: dict, *, retain_floor: float = 0.99, nll_bound: float = 1.0, metric: str = "cloze_prob"
) -> dict:
    """The sweep's rule with a fluency floor over the clamp edits of `compare_edits`' result (needs its "base"
    edit): {"clamp": the picked edit or None, "without_fluency_floor", "sensitivity" {bound: edit}, and the
    floors}."""
    points = result["edits"]
    base = points["base"]
    floor = retain_floor * base["retain"][metric]
    base_nll = result["base_fluency"]["forget"]["nll_per_token"] if result.get("base_fluency") else None

    def pick(bound):
        ok = [
            (edit, p)
            for edit, p in points.items()
            if edit.startswith("clamp:")
            and p["retain"][metric] >= floor - 1e-12
            and (bound == float("inf") or (fired_nll(p) is not None and fired_nll(p) <= base_nll + bound + 1e-12))
        ]
        return min(ok, key=lambda e: (e[1]["forget"][metric], fired_nll(e[1]) or 0.0))[0] if ok else None

    return {
        "metric": metric,
        "retain_floor": floor,
        "base_fired_nll": base_nll,
        "nll_bound": nll_bound,
        "clamp": pick(nll_bound),
        "without_fluency_floor": pick(float("inf")),
        "sensitivity": {f"{b:g}": pick(b) for b in SENSITIVITY},
    }


# ------------------------------------------------------------------------------------ outputs
def clamp_value(edit: str) -> float:
    return parse_edit(edit)["clamp"]


def plot_frontier(result: dict, pick: dict, path, *, metric: str = "cloze_prob"):
    """Two panels: forget score (log) against the fired answers' NLL, and against the retain score; the clamp
    values as one line from the largest to the smallest, the other edits as points, the base as a star."""
    fig = new_figure(11.0, 4.6)
    points = result["edits"]
    clamps = sorted((e for e in points if e.startswith("clamp:")), key=clamp_value, reverse=True)
    others = [e for e in points if not e.startswith("clamp:") and e not in ("base", "monitor")]

    def forget(e):  # a refusing row's cloze p is 0: drawn at 1e-14 on the log axis
        return max(points[e]["forget"][metric], 1e-14)

    panels = [
        (
            lambda e: fired_nll(points[e]),
            "fired answers: NLL per token under the base (lower: more fluent)",
            (pick["base_fired_nll"] or 0) + pick["nll_bound"],
            f"fluency floor: base + {pick['nll_bound']:g}",
        ),
        (
            lambda e: points[e]["retain"][metric],
            f"retain {metric.replace('_', ' ')} (higher: utility kept)",
            pick["retain_floor"],
            "99% of base retain",
        ),
    ]
    for i, (x, xlabel, line, line_label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        if clamps:
            ax.plot([x(e) for e in clamps], [forget(e) for e in clamps], marker="o", color=COLORS[0], label="clamp c")
            for e in clamps:
                text = f"c={clamp_value(e):g}" + (" (pick)" if e == pick["clamp"] else "")
                ax.annotate(text, (x(e), forget(e)), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for j, e in enumerate(others):
            zero = points[e]["forget"][metric] <= 0
            ax.scatter(
                [x(e)],
                [forget(e)],
                marker="s^D"[j % 3],
                s=50,
                color=COLORS[(j + 1) % len(COLORS)],
                label=points[e]["label"] + (" (cloze p 0, at 1e-14)" if zero else ""),
                zorder=3,
            )
        if "base" in points and x("base") is not None:
            ax.scatter([x("base")], [forget("base")], marker="*", s=120, color="black", label="base", zorder=3)
        ax.axvline(line, color="gray", linestyle=":", label=line_label)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(f"forget {metric.replace('_', ' ')} (lower: more forgotten)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.axes[0].set_title("forgetting against fluency of fired answers", fontsize=10)
    fig.axes[1].set_title("forgetting against retain", fontsize=10)
    return save_figure(fig, path)


def table_lines(result: dict, edits, *, metric: str = "cloze_prob") -> list[str]:
    """A Markdown table, one row per edit of `edits` present in `result`."""
    lines = [
        "| edit | forget cloze p (fired prompts) ↓ | forget cloze p ↓ | retain cloze p ↑ | fired NLL ↓ | distinct-2 ↑ "
        "| repeated 3-grams ↓ | leak | leak only | retain-prompt NLL ↓ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for edit in edits:
        p = result["edits"].get(edit)
        if p is None:
            continue
        f, r = p["fluency"].get("forget") or {}, p["fluency"].get("retain") or {}
        lines.append(
            f"| {p['label']} | {fmt_sci(p['fired_cloze_p'])} | {fmt_sci(p['forget'][metric])} | "
            f"{fmt_sci(p['retain'][metric])} | {fmt_fixed(f.get('nll_per_token'))} | "
            f"{fmt_fixed(f.get('distinct_2'))} | "
            f"{fmt_fixed(f.get('repeated_3gram_share'))} | {fmt_fixed(f.get('answer_leak_rate'), 2)} | "
            f"{fmt_fixed(f.get('answer_only_leak_rate'), 2)} | {fmt_fixed(r.get('nll_per_token'))} |"
        )
    return lines


def fmt_sci(x) -> str:
    """0 as "0", small values in scientific notation, others with three decimals."""
    if x is None:
        return ""
    if x == 0:
        return "0"
    return f"{x:.3g}" if abs(x) < 1e-3 else f"{x:.3f}"


def example_lines(result: dict, edits, *, k: int = 3) -> list[str]:
    """The first `k` fired prompts, each with every edit's answer."""
    lines = []
    for i, prompt in enumerate(result.get("prompts", [])[:k]):
        lines += [
            "",
            f"**{i + 1}. {md_excerpt(prompt['question'], 200)}** (answer: {md_excerpt(prompt['answer'], 80)})",
            "",
            "| edit | answer |",
            "|---|---|",
        ]
        for edit in edits:
            p = result["edits"].get(edit)
            if p is not None and i < len(p["examples"]):
                lines.append(f"| {p['label']} | {md_excerpt(p['examples'][i], 200)} |")
    return lines
