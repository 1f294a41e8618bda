"""The `dsg eval` report: its contract, `report.json`, defined once; and its writing.

`evaluate.py` builds the results rows and the dilution block with the constructors here; `write_report`
checks the whole report with `check_report` and writes report.json (`clean_json`: numbers JSON can hold),
the plots (`write_plots`, drawn by `plots.py`) and summary.md (`summary_markdown`, cells and numbers from
`markdown.py`). `publishing/cards.py` checks a report it reads the same way and gets the model columns
with `model_columns` / `row_value`. `docs/publishing.md` shows the same keys. A report without
"schema_version" is version 1: the same keys, written before the version and the dilution block existed.

    {
      "schema_version": 2,
      "model": "/abs/path/of/the/DSG/folder",
      "results": [ResultRow, ...],                 # one row per (dataset, metric)
      "baselines": ["RMU", ...],                   # the --baseline names, in order ([] when none)
      "baseline_models": {"RMU": "/abs/dir"},      # only with --baseline
      "trigger_rates": {DATASET: {GUARDRAIL: TriggerRate}},
      "dilution": Dilution,                        # only with --dilution
      "guardrails": [ReportGuardrail, ...],        # the evaluated model's guardrails, in order
      ...                                          # the rest: see EvalReport
    }

    ResultRow   {"dataset", "metric", "base", "dsg", "n", "higher_is_better",
                 "baselines": {NAME: value},        # every --baseline name; null where not scored
                 "dataset_id"?, "dataset_config"?, "dataset_split"?}   # for Hub data sets
    TriggerRate {"rate", "fired", "n"}               # fired of n prompts (texts); rate = fired / n
    Dilution    {"dataset": forget label, "filler": filler label, "n": prompts, "factors": [1, 2, 5, 10],
                 "placements": ["prefix", "suffix", "split"],   # optional; absent: ["prefix"]
                 "seed": filler offsets' seed,
                 "by_guardrail": {GUARDRAIL: {"score", "undiluted_trigger_rate",
                                              CELL: DilutionStep, ...}}}
                 one CELL per placement and factor, keyed by `cell_key`: "1x", "2x", "5x", "10x" (filler in
                 front, the keys of version 2 reports before placements existed), "suffix 1x", ... (after the
                 prompt), "split 1x", ... (between the prompt's two halves); see `dilution.dilute`
    DilutionStep {"fired_before", "evaded", "attack_success", "trigger_rate"}   # `dilution.attack_success`
    ReportGuardrail {"name", "layer", "mode", "score", "tau", "n_features", "window"?, "action", "refusal"?}
                 action (configuration_dsg.ACTIONS) is what the "dsg" column measured on the rows the
                 guardrail fired on: "clamp" edited them; "monitor" edited nothing (dsg equals base on
                 every row, the trigger rates are the decisions it would take); "refuse" forced the
                 refusal's next token at every position of those rows, so their answer letters are all
                 equally unlikely (correct-letter probability 1/4, raw probability about 0, accuracy
                 decided by the tie: the first letter) and their answer texts' likelihoods are about 0.
                 Reports written before actions existed have no "action": read it as "clamp".

The dilution block has the shape of the one `dsg results` writes (results.json "dilution", which also
has a second filler's cells, their keys tagged "mmlu ..."), plus "dataset", "filler", "seed" and each
guardrail's "score". Numbers that could not be computed are null.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import time
from pathlib import Path
from typing import NotRequired, TypedDict

from ..errors import DSGError
from .markdown import fmt_delta, fmt_number, fmt_percent, md_cell

SCHEMA_VERSION = 2
REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.md"
MODELS = {"base": "base", "dsg": "DSG"}  # the models every row has a number for: key -> column header
# where the dilution filler goes (`dilution.dilute`): in front of the prompt, after it, between its two halves
PLACEMENTS = ("prefix", "suffix", "split")


class ResultRow(TypedDict):
    dataset: str
    metric: str
    base: float | None
    dsg: float | None
    n: int
    higher_is_better: bool
    baselines: dict[str, float | None]
    dataset_id: NotRequired[str]
    dataset_config: NotRequired[str]
    dataset_split: NotRequired[str]


class TriggerRate(TypedDict):
    rate: float | None
    fired: int
    n: int


class DilutionStep(TypedDict):
    fired_before: int  # prompts that fired undiluted
    evaded: int  # of those, the ones that no longer fire with the filler
    attack_success: float | None  # evaded / fired_before (null when none fired)
    trigger_rate: float  # fired / n with the filler


class Dilution(TypedDict):
    dataset: str
    filler: str
    n: int
    factors: list[int]
    placements: NotRequired[list[str]]  # PLACEMENTS, in order; absent in older reports: ["prefix"]
    seed: int
    by_guardrail: dict[str, dict]  # GUARDRAIL -> {"score", "undiluted_trigger_rate", cell_key(...): DilutionStep}


class ReportGuardrail(TypedDict):
    name: str
    layer: int
    mode: str
    score: str
    tau: float
    n_features: int
    window: NotRequired[int]  # scores "window" and "features" only
    action: NotRequired[str]  # "clamp", "refuse" or "monitor"; absent in older reports: "clamp"
    refusal: NotRequired[str]  # action "refuse" only


class EvalReport(TypedDict, total=False):
    schema_version: int
    model: str
    results: list[ResultRow]
    baselines: list[str]
    baseline_models: dict[str, str]
    trigger_rates: dict[str, dict[str, TriggerRate]]
    dilution: Dilution
    # written by `dsg eval`, not read by the card (their shapes are described in evaluate.py):
    trigger_rates_by_subject: dict
    accuracy_by_subject: dict
    known_filter: dict
    rho: dict
    metrics: dict
    datasets: dict
    guardrails: list[ReportGuardrail]
    settings: dict
    timings: dict
    plots: list
    versions: dict


# ------------------------------------------------------------------------------------ writing
def result_row(
    dataset: str, metric: str, base, dsg, *, n: int, higher_is_better: bool, hub: dict | None = None
) -> ResultRow:
    """A results row without baselines yet (`add_baselines` fills "baselines")."""
    return {
        "dataset": dataset,
        "metric": metric,
        "base": base,
        "dsg": dsg,
        "n": n,
        "higher_is_better": higher_is_better,
        "baselines": {},
        **(hub or {}),
    }


def cell_key(placement: str, factor: int, filler: str = "") -> str:
    """The key of one dilution cell in a guardrail's dilution entry: ("prefix", 1) -> "1x" (the keys of
    reports written before placements existed), ("suffix", 2) -> "suffix 2x", ("split", 10) -> "split 10x".
    A non-empty `filler` tag comes first (`dsg results`' second filler): ("suffix", 2, "mmlu") -> "mmlu suffix 2x"."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown dilution placement {placement!r} (one of {', '.join(PLACEMENTS)})")
    return " ".join(part for part in (filler, "" if placement == "prefix" else placement, f"{factor}x") if part)


def factor_key(factor: int) -> str:
    """The key of one dilution factor, filler in front: 1 -> "1x" (`cell_key("prefix", factor)`)."""
    return cell_key("prefix", factor)


# ------------------------------------------------------------------------------------ reading
def model_columns(report: dict) -> list[tuple[str, str]]:
    """(key, header) of every model the results rows have numbers for: base, DSG, then each baseline."""
    return [*MODELS.items(), *((name, name) for name in report.get("baselines") or [])]


def row_value(row: dict, key: str):
    """A results row's number for one model column (`model_columns` keys); None if it has none."""
    if key in MODELS:
        return row.get(key)
    return (row.get("baselines") or {}).get(key)


def dilution_placements(block: dict) -> list[str]:
    """The placements a dilution block measured, in order (["prefix"] for reports written before placements)."""
    return list(block.get("placements") or ["prefix"])


def dilution_cells(block: dict) -> list[tuple[str, int, str]]:
    """(placement, factor, cell key) of every cell of a dilution block: placement by placement, factors in order."""
    return [(p, f, cell_key(p, f)) for p in dilution_placements(block) for f in block["factors"]]


def dilution_rows(block: dict) -> list[dict]:
    """One dict per guardrail of a dilution block: guardrail, score, undiluted_trigger_rate, fired_before
    (prompts that fired undiluted), n, attack_success: [(cell key, rate or None), ...] of every cell in
    `dilution_cells` order, and by_placement: [(placement, [(factor key, rate or None), ...]), ...]."""
    rows = []
    for name, entry in block["by_guardrail"].items():
        steps = [(p, f, key, entry[key]) for p, f, key in dilution_cells(block)]
        rows.append(
            {
                "guardrail": name,
                "score": entry["score"],
                "undiluted_trigger_rate": entry["undiluted_trigger_rate"],
                "fired_before": steps[0][3]["fired_before"] if steps else None,
                "n": block["n"],
                "attack_success": [(key, step["attack_success"]) for _, _, key, step in steps],
                "by_placement": [
                    (p, [(factor_key(f), step["attack_success"]) for q, f, _, step in steps if q == p])
                    for p in dilution_placements(block)
                ],
            }
        )
    return rows


# ---------------------------------------------------------------------------------- checking
def _is_number(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise DSGError(f"{where}: {what}")


def _check_row(row, where: str, baselines: list) -> None:
    _need(isinstance(row, dict), where, "must be an object")
    for key in ("dataset", "metric"):
        _need(isinstance(row.get(key), str), where, f"needs a string {key!r}")
    for key in MODELS:
        _need(_is_number(row.get(key)), where, f"{key!r} must be a number or null")
    _need("n" not in row or _is_count(row["n"]), where, "'n' must be a count")
    _need(
        "higher_is_better" not in row or isinstance(row["higher_is_better"], bool),
        where,
        "'higher_is_better' must be true or false",
    )
    values = row.get("baselines", {})
    _need(isinstance(values, dict), where, "'baselines' must be an object")
    for name, value in values.items():
        _need(name in baselines, where, f"baseline {name!r} is not in the report's 'baselines'")
        _need(_is_number(value), where, f"baseline {name!r} must be a number or null")


def _check_rates(rates, where: str) -> None:
    _need(isinstance(rates, dict), where, "must be an object {dataset: {guardrail: {rate, fired, n}}}")
    for dataset, per_guard in rates.items():
        _need(isinstance(per_guard, dict), f"{where}[{dataset!r}]", "must be an object {guardrail: {rate, fired, n}}")
        for guard, value in per_guard.items():
            here = f"{where}[{dataset!r}][{guard!r}]"
            _need(
                isinstance(value, dict)
                and _is_number(value.get("rate"))
                and _is_count(value.get("n"))
                and _is_count(value.get("fired")),
                here,
                "must be {rate: number or null, fired: count, n: count}",
            )


def _check_dilution(block, where: str) -> None:
    _need(isinstance(block, dict), where, "must be an object")
    for key in ("dataset", "filler"):
        _need(isinstance(block.get(key), str), where, f"needs a string {key!r}")
    _need(_is_count(block.get("n")), where, "'n' must be a count")
    factors = block.get("factors")
    _need(
        isinstance(factors, list) and all(_is_count(f) and f > 0 for f in factors),
        where,
        "'factors' must be a list of positive integers",
    )
    placements = block.get("placements", ["prefix"])
    _need(
        isinstance(placements, list)
        and placements
        and all(p in PLACEMENTS for p in placements)
        and len(set(placements)) == len(placements),
        where,
        f"'placements' must be a list of distinct placements ({', '.join(PLACEMENTS)})",
    )
    by_guardrail = block.get("by_guardrail")
    _need(isinstance(by_guardrail, dict), where, "'by_guardrail' must be an object")
    for guard, entry in by_guardrail.items():
        here = f"{where}.by_guardrail[{guard!r}]"
        _need(isinstance(entry, dict) and isinstance(entry.get("score"), str), here, "needs a string 'score'")
        _need(
            _is_number(entry.get("undiluted_trigger_rate")), here, "'undiluted_trigger_rate' must be a number or null"
        )
        for _, _, key in dilution_cells(block):
            step = entry.get(key)
            _need(
                isinstance(step, dict)
                and _is_count(step.get("fired_before"))
                and _is_count(step.get("evaded"))
                and _is_number(step.get("attack_success"))
                and _is_number(step.get("trigger_rate")),
                f"{here}[{key!r}]",
                "must be {fired_before: count, evaded: count, attack_success: number or null, trigger_rate: number}",
            )


def check_report(report, where: str = "report.json") -> dict:
    """Return `report` if it follows this schema; else a `DSGError` naming the first wrong key.

    Checked: schema_version, results, baselines, baseline_models, trigger_rates and dilution (what the card reads);
    the other keys are the writer's business and are not checked.
    """
    _need(isinstance(report, dict), where, "must hold a JSON object")
    version = report.get("schema_version", 1)
    _need(
        isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= SCHEMA_VERSION,
        where,
        f"schema_version {version!r} is not one this version of modeling_dsg reads (1 to {SCHEMA_VERSION}); "
        "re-run `dsg eval` or update modeling_dsg",
    )
    baselines = report.get("baselines", [])
    _need(
        isinstance(baselines, list) and all(isinstance(b, str) for b in baselines),
        where,
        "'baselines' must be a list of names",
    )
    models = report.get("baseline_models", {})
    _need(
        isinstance(models, dict) and all(isinstance(v, str) for v in models.values()),
        where,
        "'baseline_models' must be an object {name: folder}",
    )
    results = report.get("results", [])
    _need(isinstance(results, list), where, "'results' must be a list of rows")
    for i, row in enumerate(results):
        _check_row(row, f"{where}: results[{i}]", baselines)
    if "trigger_rates" in report:
        _check_rates(report["trigger_rates"], f"{where}: trigger_rates")
    if "dilution" in report:
        _check_dilution(report["dilution"], f"{where}: dilution")
    return report


# ------------------------------------------------- writing out: report.json, the plots, summary.md
def clean_json(obj):
    """JSON-safe: numpy scalars to Python, NaN/inf to null, tuples to lists."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean_json(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def _cell(text) -> str:
    return md_cell(text, tidy=False)


def action_notes(guardrails: list) -> list[str]:
    """What the DSG column means for guardrails that do not clamp (report "guardrails", `ReportGuardrail`)."""
    notes = []
    for g in guardrails:
        name, action = _cell(g.get("name")), g.get("action", "clamp")
        if action == "monitor":
            notes.append(
                f"Guardrail `{name}` only monitors (action `monitor`): it edits nothing, so it adds nothing "
                "to DSG − base; its trigger rates are the decisions it would take."
            )
        elif action == "refuse":
            notes.append(
                f"Guardrail `{name}` refuses (action `refuse`): on the rows it fires on, every position puts "
                "all the probability on the refusal's next token, so the four answer letters are equally "
                "unlikely (correct-letter probability 0.25, raw probability 0, and accuracy 0: a row whose "
                "letters all tie gave no answer) and the answer text's "
                "log-likelihood is about -3.4e38 per token (probability 0). Those numbers measure the "
                "refusals, not what the model still knows."
            )
    return notes


def summary_markdown(report: dict) -> str:
    """The results, trigger-rate, dilution and known-filter tables of a report, in Markdown."""
    columns = model_columns(report)
    models, others = columns[: len(MODELS)], columns[len(MODELS) :]  # base and DSG; the baselines
    lines = [
        f"# DSG evaluation: {report.get('model', '')}",
        "",
        "Base model and DSG model side by side (same instance, guardrails off / on).",
        "",
        "| dataset | metric | n |"
        + "".join(f" {_cell(h)} |" for _, h in models)
        + " DSG − base |"
        + "".join(f" {_cell(h)} |" for _, h in others),
        "|---|---|---:|" + "---:|" * (len(models) + 1 + len(others)),
    ]
    for r in report["results"]:
        arrow = " ↑" if r.get("higher_is_better") else " ↓"
        delta = fmt_delta(r.get("base"), r.get("dsg"))
        lines.append(
            f"| {_cell(r['dataset'])} | {_cell(r['metric'])}{arrow} | {fmt_number(r.get('n'))} |"
            + "".join(f" {fmt_number(row_value(r, key))} |" for key, _ in models)
            + f" {delta} |"
            + "".join(f" {fmt_number(row_value(r, key))} |" for key, _ in others)
        )
    notes = action_notes(report.get("guardrails", []))
    if notes:
        lines += ["", *notes]
    names = [g["name"] for g in report.get("guardrails", [])]
    if report["trigger_rates"] and names:
        lines += [
            "",
            "## Guardrail trigger rates",
            "",
            "| dataset | " + " | ".join(f"`{n}`" for n in names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for label, per in report["trigger_rates"].items():
            cells = [
                f"{fmt_percent(per[n]['rate'])} of {per[n]['n']}" if per.get(n, {}).get("rate") is not None else "n/a"
                for n in names
            ]
            lines.append(f"| {_cell(label)} | " + " | ".join(cells) + " |")
    if report.get("dilution"):
        block = report["dilution"]
        keys = [factor_key(f) for f in block["factors"]]
        lines += [
            "",
            "## Dilution attack",
            "",
            f"{block['n']} prompts of {_cell(block['dataset'])} with filler from {_cell(block['filler'])}, "
            "k times their length, put in front of the prompt (prefix), after it (suffix) or between its two "
            "halves (split). Attack success: of the prompts that fired undiluted, the fraction that no "
            "longer fire.",
            "",
            "| guardrail | score | fired undiluted | filler at |" + "".join(f" {k} |" for k in keys),
            "|---|---|---:|---|" + "---:|" * len(keys),
        ]
        for row in dilution_rows(block):
            for placement, steps in row["by_placement"]:
                lines.append(
                    f"| `{_cell(row['guardrail'])}` | `{_cell(row['score'])}` | {fmt_number(row['fired_before'])} of "
                    f"{fmt_number(row['n'])} | {placement} |" + "".join(f" {fmt_number(v)} |" for _, v in steps)
                )
    if report["known_filter"]:
        lines += [
            "",
            "## Known questions (base correct under every permutation)",
            "",
            "| dataset | permutations | kept | of |",
            "|---|---:|---:|---:|",
        ]
        for label, kf in report["known_filter"].items():
            lines.append(f"| {_cell(label)} | {kf['permutations']} | {kf['kept']} | {kf['n']} |")
    if report.get("fluency"):
        from .fluency import summary_lines

        lines += [""] + summary_lines(report["fluency"])
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "guardrail"


def write_plots(report: dict, arrays: dict, folder: Path) -> list[str]:
    """The PNGs of a report into `folder`; returns their file names."""
    from . import plots

    written = []
    labels = arrays["labels"]
    for g in report["guardrails"]:
        name = g["name"]
        rho = {
            labels[role]: arrays["rho"][role][name]
            for role in ("forget", "retain", "text")
            if role in arrays["rho"] and name in arrays["rho"][role]
        }
        if rho:
            file = f"rho_{_slug(name)}.png"
            plots.plot_rho_histograms(rho, g["tau"], folder / file, title=f"guardrail '{name}': rho per sequence")
            written.append(file)
        bars = {}
        for role in ("forget", "retain"):
            label = labels.get(role)
            if label is None:
                continue
            per_subject = report["trigger_rates_by_subject"].get(label)
            if per_subject:
                bars[label] = {s: (v[name]["rate"], v[name]["n"]) for s, v in per_subject.items() if name in v}
            elif name in report["trigger_rates"].get(label, {}):
                v = report["trigger_rates"][label][name]
                bars[label] = {"all questions": (v["rate"], v["n"])}
        if bars:
            file = f"trigger_rates_{_slug(name)}.png"
            plots.plot_trigger_rates(bars, folder / file, title=f"guardrail '{name}': trigger rate per subject")
            written.append(file)
    f_label, r_label = labels.get("forget"), labels.get("retain")
    for kind, key, metric, file in (
        ("letter", "accuracy", "accuracy", "tradeoff_accuracy.png"),
        ("cloze", "correct_logprob_per_length", "cloze log-likelihood per token", "tradeoff_cloze.png"),
    ):
        mf, mr = report["metrics"].get(f_label, {}), report["metrics"].get(r_label, {})
        if kind not in mf.get("base", {}) or kind not in mr.get("base", {}):
            continue
        points = [
            {"label": who, "x": mr[col][kind][key], "y": mf[col][kind][key]}
            for who, col in (("base", "base"), ("DSG", "dsg"))
        ]
        plots.plot_tradeoff(
            points,
            folder / file,
            xlabel=f"retain: {r_label} {metric}",
            ylabel=f"forget: {f_label} {metric}",
            title=f"forget/retain trade-off ({metric})",
        )
        written.append(file)
    return written


def write_report(report: dict, arrays: dict, folder: Path) -> None:
    """report.json, the plots and summary.md into `folder`."""
    folder = Path(folder)
    start = time.perf_counter()
    report["plots"] = write_plots(report, arrays, folder)
    report["timings"]["plots_s"] = time.perf_counter() - start
    clean = check_report(clean_json(report), REPORT_FILE)  # what is written follows the schema above
    (folder / REPORT_FILE).write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (folder / SUMMARY_FILE).write_text(summary_markdown(clean), encoding="utf-8")
