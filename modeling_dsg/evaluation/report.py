"""The `dsg eval` report, `report.json`: its contract, defined once.

`evaluation.py` builds the results rows and the dilution block with the constructors here and checks
the whole report with `check_report` before writing it; `cards.py` checks a report it reads the same
way and gets the model columns with `model_columns` / `row_value`. `docs/publishing.md` shows the same
keys. A report without "schema_version" is version 1: the same keys, written before the version and
the dilution block existed.

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
                 prompt), "split 1x", ... (between the prompt's two halves); see `results.dilute`
    DilutionStep {"fired_before", "evaded", "attack_success", "trigger_rate"}   # `results.attack_success`
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

from typing import NotRequired, TypedDict

from ..errors import DSGError

SCHEMA_VERSION = 2
MODELS = {"base": "base", "dsg": "DSG"}  # the models every row has a number for: key -> column header
# where the dilution filler goes (`results.dilute`): in front of the prompt, after it, between its two halves
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
    window: NotRequired[int]  # score "window" only
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
    # written by `dsg eval`, not read by the card (their shapes are described in evaluation.py):
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
