"""Model cards for DSG model folders, rendered from the Jinja template in `modeling_dsg/publishing/templates/`.

`render_card(model_dir, repo_id=None)` reads what `dsg build` and `dsg eval` wrote into a model folder and
returns a `huggingface_hub.ModelCard`. The YAML metadata is built only through `ModelCardData` and
`EvalResult` (never hand-written YAML); the body comes from the template
`modeling_dsg/publishing/templates/dsg_model_card.md` through `ModelCard.from_template`.

What is read (only `config.json` is required; every other file and field may be missing, and the card
then says "not measured" or "not recorded" instead of guessing):

    config.json       model_type "dsg", text_config, guardrails [{name, layer, mode, features, clamp,
                      threshold, score, action, refusal, sae: {architecture, d_in, d_sae, k, source, ...}}],
                      optional base_model / license (a guardrail without "action" is "clamp")
    features.json     `data.records.FeaturesFile` (per guardrail, each feature's statistics and top tokens)
    dsg_build.json    `data.records.BuildRecord` (per guardrail: sources, options, tau, rho summaries,
                      held-out trigger rates, calibration)
    EVAL/report.json  the `dsg eval` report, EVAL = `eval_dir` (default `<model_dir>/eval`), in the schema
                      of `evaluation.report` (checked with its `check_report`; a report that does not
                      follow it is a `DSGError`). The card shows its results rows (base, DSG, DSG − base and
                      one column per --baseline NAME), the baseline folders, the trigger rates, and the
                      dilution block in the Evaluation section and in Limitations.
    EVAL/*.png        plots, embedded in the card as eval/<name>.png

The `model-index` holds one `EvalResult` per results row that has a "dsg" value (task
text-generation, metric_type = "metric", metric_value = the DSG model's number).

The license is the base model's: an explicit `license=`, else a `license` field in config.json or
dsg_build.json, else the base model's own card (a local folder's README.md, or the Hub card in the
local Hugging Face cache), else a local GGUF file's `general.license`, else a small table of known
bases (SmolLM2: apache-2.0). When none of these is known, the card has no license field and says so.
"""

from __future__ import annotations

from pathlib import Path

from ..analysis.explain import when_fired
from ..data.hub import is_repo_id
from ..data.sources import check_dsg_folder, read_json_file
from ..errors import DSGError
from ..evaluation.markdown import finite_number, fmt_delta, fmt_number, fmt_percent, md_cell
from ..evaluation.report import (
    MODELS,
    check_report,
    dilution_placements,
    dilution_rows,
    factor_key,
    model_columns,
    row_value,
)
from ..paths import PACKAGE_DIR, SHIPPED
from ..runtime.configuration_dsg import ACTIONS

TEMPLATE_PATH = PACKAGE_DIR / SHIPPED["card_template"]
TAGS = ["unlearning", "sparse-autoencoder", "dsg"]
NOT_MEASURED = "not measured"
NOT_RECORDED = "not recorded"
PAPER = "https://arxiv.org/abs/2504.08192"
CONTEXT_CHARS = 80


def calibration_text(calibration: dict) -> str | None:
    """How tau was chosen when a false-positive bound chose it, or when the default bound could not be met and the
    paper's percentile chose it (the build record's `calibration`), else None."""
    if not isinstance(calibration, dict):
        return None
    fallback = calibration.get("fallback")
    if isinstance(fallback, dict) and finite_number(calibration.get("threshold_percentile")):
        return (
            f"the {calibration['threshold_percentile']:g}th percentile of ρ over the retain rows used for the build "
            f"(the paper's rule: the default false-positive bound could not be met, {fallback.get('reason', '')})"
        )
    if not finite_number(calibration.get("target_fpr")):
        return None
    text = (
        f"the smallest τ whose one-sided 95% Clopper–Pearson upper bound on the retain firing rate is at most "
        f"{calibration['target_fpr']:g}"
    )
    if finite_number(calibration.get("retain_fpr")) and finite_number(calibration.get("retain_fpr_upper95")):
        text += (
            f" (on {calibration.get('retain_rows', '?')} retain rows it fired on {calibration['retain_fpr']:.3f}, "
            f"bound {calibration['retain_fpr_upper95']:.3f})"
        )
    return text


def score_text(g: dict) -> str:
    """How the guardrail's score (config "score", "window", "token_weights") is described in the card; an unknown
    score is named only."""
    score = g.get("score") or "fraction"
    if score == "features" and g.get("token_weights"):
        most = sum(w for w in g["token_weights"] if w > 0)
        return (
            f"the largest share, over any {g.get('window', 32)} consecutive real tokens (not padding, not BOS), of "
            "the integer weights of the selected features active somewhere in those tokens, each feature counted once "
            f"and the sum floored at 0, over the most a window can have ({most}) (score `features`: the features and "
            "weights were fit on the build rows; the weights are in `config.json` and `dsg explain` shows the "
            "features each token activates)"
        )
    flagged = "any selected feature is active"
    if g.get("token_weights"):
        flagged = (
            f"the integer weights of the active selected features add up to at least {g.get('token_threshold', 1)} "
            "(a learned token gate; the weights are in `config.json` and `dsg explain` shows each token's points)"
        )
    if g.get("token_weights") and g.get("token_value") == "points":
        most = sum(w for w in g["token_weights"] if w > 0)
        share = (
            "the share of the most points its real tokens (not padding, not BOS) could have, where a token scores "
            "the integer weights of its active selected features, summed and floored at 0 (at most "
            f"{most}; a learned token gate; the weights are in `config.json` and `dsg explain` shows each token's "
            "points)"
        )
        if score == "window":
            window = g.get("window", 32)
            return f"{share}, over any {window} consecutive real tokens at best (score `window`, token value `points`)"
        return f"{share} (score `fraction`, token value `points`)"
    if score == "fraction":
        paper = ", the paper's" if not g.get("token_weights") else ""
        return f"the fraction of its real tokens (not padding, not BOS) at which {flagged} (score `fraction`{paper})"
    if score == "window":
        return (
            f"the largest fraction, over any {g.get('window', 32)} consecutive real tokens (not padding, not BOS), of "
            f"tokens at which {flagged} (score `window`: filler around a question cannot dilute it)"
        )
    return f"the `{score}` score"


# What each action (config "action") is called in the card; an unknown action is named only.
ACTION_TEXT = {
    "clamp": "`clamp` (the paper's edit: the selected features are clamped)",
    "refuse": "`refuse` (the model answers with a fixed refusal)",
    "monitor": "`monitor` (decide and report only; nothing is edited)",
}


# Bases whose Hub id and license are known when the base was given as a local file (e.g. the GGUF of the
# embedded default). Keys are lower-case prefixes of the file or folder name.
KNOWN_BASES = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "smollm2-360m-instruct": ("HuggingFaceTB/SmolLM2-360M-Instruct", "apache-2.0"),
    "smollm2-1.7b-instruct": ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "apache-2.0"),
}


# ----------------------------------------------------------------------------------------- reading
def _optional_json(path: Path, what: str) -> dict:
    if not path.is_file():
        return {}
    data = read_json_file(path, what)
    if not isinstance(data, dict):
        raise DSGError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _checked_record(path: Path) -> dict:
    """features.json / dsg_build.json checked against `data.records`, or {} when absent."""
    from ..data.records import read_record

    data = read_record(path) if path.is_file() else None
    return data or {}


def load_folder(model_dir, eval_dir=None) -> dict:
    """Everything the card is made from: config, features, build, report and plot file names."""
    model_dir = Path(model_dir)
    config = check_dsg_folder(model_dir)
    eval_dir = Path(eval_dir) if eval_dir is not None else model_dir / "eval"
    if eval_dir.exists() and not eval_dir.is_dir():
        raise DSGError(f"evaluation folder {eval_dir} is not a folder")
    report_path = eval_dir / "report.json"
    return {
        "config": config,
        "features": _checked_record(model_dir / "features.json"),
        "build": _checked_record(model_dir / "dsg_build.json"),
        "report": check_report(_optional_json(report_path, "evaluation report"), f"evaluation report {report_path}"),
        "plots": sorted(p.name for p in eval_dir.glob("*.png")) if eval_dir.is_dir() else [],
        "has_chat_template": (model_dir / "chat_template.jinja").is_file()
        or "chat_template" in _optional_json(model_dir / "tokenizer_config.json", "tokenizer config"),
    }


# ----------------------------------------------------------------------------------------- formats
# cells and numbers come from `evaluation.markdown` (`md_cell`, `fmt_number`, ...); the card's own defaults:
def fmt(x, digits: int = 3, missing: str = NOT_MEASURED) -> str:
    """A number for a table: integers as is, floats with `digits` decimals (scientific when tiny or huge)."""
    return fmt_number(x, digits, missing, small_sci=True)


def pct(x, missing: str = NOT_MEASURED) -> str:
    """A rate in [0, 1] as a percentage with one decimal."""
    return fmt_percent(x, missing)


def md_token(token: str) -> str:
    """A token as an inline code span; spaces shown as ␣ and newlines as ↵ so they stay visible."""
    text = str(token).replace(" ", "␣").replace("\n", "↵").replace("\r", "").replace("\t", "⇥")
    text = text.replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def short_source(spec) -> str:
    """A source as shown in the card: absolute local paths are cut to their last two parts."""
    spec = str(spec)
    path = Path(spec)
    if path.is_absolute():
        return "/".join(path.parts[-2:])
    return spec


# ------------------------------------------------------------------------------------ base model
def _license_from_card(readme: Path) -> str | None:
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a README that is not a card: no license known from it
        return None


def _gguf_metadata_string(path: Path, key: str) -> str | None:
    """One string value from a GGUF file's key/value header, without reading the tensors.

    `gguf.GGUFReader` parses the whole file (seconds for the 49k-token vocabulary arrays); the license
    sits in the first few header entries, so this walks the header (little-endian GGUF v2/v3) and stops
    at `key`. Layout: magic, version u32, tensor count u64, kv count u64, then per entry a string key
    (u64 length + bytes), a value type u32 (`gguf.GGUFValueType`) and the value.
    """
    import struct

    from gguf import GGUF_MAGIC
    from gguf import GGUFValueType as T

    fixed = {
        T.UINT8: 1,
        T.INT8: 1,
        T.UINT16: 2,
        T.INT16: 2,
        T.UINT32: 4,
        T.INT32: 4,
        T.FLOAT32: 4,
        T.BOOL: 1,
        T.UINT64: 8,
        T.INT64: 8,
        T.FLOAT64: 8,
    }
    try:
        with open(path, "rb") as f:

            def read(fmt):
                return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

            def read_str() -> bytes:
                return f.read(read("Q"))

            def skip(vtype):
                if vtype == T.STRING:
                    f.seek(read("Q"), 1)
                elif vtype == T.ARRAY:
                    item, count = read("I"), read("Q")
                    if item in fixed:
                        f.seek(fixed[item] * count, 1)
                    else:
                        for _ in range(count):
                            skip(item)
                else:
                    f.seek(fixed[T(vtype)], 1)

            if read("I") != GGUF_MAGIC or read("I") not in (2, 3):
                return None
            read("Q")
            for _ in range(read("Q")):
                name, vtype = read_str().decode("utf-8", "replace"), read("I")
                if name == key:
                    return read_str().decode("utf-8", "replace") if vtype == T.STRING else None
                skip(vtype)
    except (OSError, ValueError, KeyError, struct.error):  # not a readable GGUF: nothing known from it
        return None
    return None


def _license_from_gguf(path: Path) -> str | None:
    return _gguf_metadata_string(path, "general.license")


def _license_from_hub_cache(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "README.md")
    except Exception:
        return None
    return _license_from_card(Path(cached)) if isinstance(cached, str) else None


def _known_base(name: str):
    name = Path(name).name.lower()
    for prefix, known in KNOWN_BASES.items():
        if name.startswith(prefix):
            return known
    return None


def resolve_base(config: dict, build: dict, base_model: str | None = None, license: str | None = None) -> dict:
    """The base model's Hub id (for `base_model` metadata), a display name, and its license.

    Candidates, in order: `base_model` (the caller's), dsg_build.json "base_model", config.json
    "base_model", text_config "_name_or_path". The Hub id is the first candidate that looks like
    OWNER/NAME and is not a local path, else one known from a local file's name (`KNOWN_BASES`).
    """
    text_config = config.get("text_config") or {}
    candidates = [base_model, build.get("base_model"), config.get("base_model"), text_config.get("_name_or_path")]
    candidates = [str(c) for c in candidates if isinstance(c, str) and c.strip()]
    hub_id = None
    local = []
    for c in candidates:
        if Path(c).expanduser().exists():
            local.append(Path(c).expanduser())
        elif hub_id is None and is_repo_id(c):
            hub_id = c
    known = next((k for k in (_known_base(str(p)) for p in local) if k), None)
    if hub_id is None and known:
        hub_id = known[0]

    lic, lic_from = license, "as given when publishing" if license else None
    for value, source in (
        (config.get("license"), "recorded in config.json"),
        (build.get("license"), "recorded in dsg_build.json"),
    ):
        if lic is None and isinstance(value, str) and value:
            lic, lic_from = value, source
    for path in local:
        if lic is not None:
            break
        if path.is_dir() and (path / "README.md").is_file():
            lic, lic_from = (
                _license_from_card(path / "README.md"),
                f"read from the base model's card, `{path.name}/README.md`",
            )
        elif path.is_file() and path.suffix == ".gguf":
            lic, lic_from = _license_from_gguf(path), f"read from the base GGUF file's metadata, `{path.name}`"
    if lic is None and hub_id:
        lic, lic_from = _license_from_hub_cache(hub_id), f"read from the cached Hub card of {hub_id}"
    if lic is None:
        known = known or (_known_base(hub_id.split("/")[-1]) if hub_id else None)
        if known:
            lic, lic_from = known[1], f"the published license of {known[0]}"
    if lic is None:
        lic_from = None
    if hub_id:
        display = f"[{hub_id}](https://huggingface.co/{hub_id})"
    elif candidates:
        display = f"`{Path(candidates[0]).name}` (a local model, not a Hub id)"
    else:
        display = "a base model that was not recorded"
    return {"hub_id": hub_id, "display": display, "license": lic, "license_from": lic_from}


# ------------------------------------------------------------------------------------ guardrails
def _by_name(items, name: str, index: int) -> dict:
    """The entry of `items` with this name, else the one at `index` when it has no name."""
    items = [i for i in (items or []) if isinstance(i, dict)]
    for item in items:
        if item.get("name") == name:
            return item
    if index < len(items) and "name" not in items[index]:
        return items[index]
    return {}


def _summary_row(label: str, summary) -> dict | None:
    if not isinstance(summary, dict) or not summary:
        return None
    return {"label": label, **{k: fmt(summary.get(k)) for k in ("n", "mean", "p50", "p95", "max")}}


def _short(text, limit: int = CONTEXT_CHARS) -> str:
    """A context snippet for a table cell: one line, at most `limit` characters."""
    text = " ".join(str(text).split())
    return md_cell(text if len(text) <= limit else text[: limit - 1] + "…")


def _ratio(x) -> str:
    """Forget/retain importance ratio; huge values (a feature silent on retain) are shown as > 1e6."""
    v = finite_number(x)
    if v is None:
        return NOT_MEASURED
    return "> 1e6" if v >= 1e6 else fmt(v, 1)


def _feature_rows(config_features: list, feature_stats: dict, max_tokens: int) -> list[dict]:
    stats = {f.get("index"): f for f in (feature_stats.get("features") or []) if isinstance(f, dict)}
    order = list(config_features) or list(stats)
    rows = []
    for index in order:
        f = stats.get(index, {})
        tokens = [t for t in (f.get("top_tokens") or []) if isinstance(t, dict) and "token" in t][:max_tokens]
        top = ", ".join(
            md_token(t["token"])
            + (f" ({fmt(t.get('activation'), 1)})" if finite_number(t.get("activation")) is not None else "")
            for t in tokens
        )
        context = next((_short(t["context"]) for t in tokens if t.get("context")), "")
        rows.append(
            {
                "index": index,
                "forget_mean": fmt(f.get("forget_mean")),
                "retain_mean": fmt(f.get("retain_mean")),
                "forget_freq": pct(f.get("forget_freq")),
                "retain_freq": pct(f.get("retain_freq")),
                "ratio": _ratio(f.get("ratio")),
                "top_tokens": top or NOT_MEASURED,
                "context": context,
            }
        )
    return rows


def guardrail_views(config: dict, features: dict, build: dict, max_tokens: int = 5) -> list[dict]:
    """One dict per guardrail with everything the template shows, numbers already formatted."""
    views = []
    for i, g in enumerate(config.get("guardrails") or []):
        if not isinstance(g, dict):
            continue
        name = str(g.get("name") or f"guardrail {i}")
        b = _by_name(build.get("guardrails"), name, i)
        fs = _by_name(features.get("guardrails"), name, i)
        calibration = b.get("calibration") if isinstance(b.get("calibration"), dict) else {}
        sae = next((s for s in (g.get("sae"), b.get("sae")) if isinstance(s, dict)), {})
        sae_source = sae.get("source") or (b.get("sae") if isinstance(b.get("sae"), str) else None)
        mode = g.get("mode") or b.get("mode") or "dynamic"
        tau = finite_number(g.get("threshold"))
        if tau is None:
            tau = finite_number(b.get("tau"))
        held = b.get("heldout") if isinstance(b.get("heldout"), dict) else {}
        rho = b.get("rho") if isinstance(b.get("rho"), dict) else {}
        arch = sae.get("architecture")
        arch_text = f"{arch} (k = {sae['k']})" if arch == "topk" and sae.get("k") else arch
        layer = g.get("layer", b.get("layer"))
        action = g.get("action") or "clamp"
        refusal = g.get("refusal") if isinstance(g.get("refusal"), str) else None
        clamp = fmt(g.get("clamp", b.get("clamp")), 1, missing=NOT_RECORDED)
        views.append(
            {
                "name": name,
                "mode": mode,
                "action": md_cell(action),
                "action_text": ACTION_TEXT.get(action, f"`{md_cell(action)}`"),
                "refusal": md_cell(refusal) if refusal is not None else None,
                "when_fired": md_cell(
                    when_fired(action, clamp=clamp, refusal=f'"{md_cell(refusal)}"' if refusal else None)
                ),
                "dynamic": mode != "static",
                "layer": layer if layer is not None else NOT_RECORDED,
                "sae_source": short_source(sae_source) if sae_source else NOT_RECORDED,
                "sae_architecture": arch_text or NOT_RECORDED,
                "d_in": fmt(sae.get("d_in"), missing=NOT_RECORDED),
                "d_sae": fmt(sae.get("d_sae"), missing=NOT_RECORDED),
                "forget_sources": [short_source(s) for s in (b.get("forget_sources") or [])],
                "retain_sources": [short_source(s) for s in (b.get("retain_sources") or [])],
                "n_features": len(g.get("features") or []) or b.get("n_features") or NOT_RECORDED,
                "clamp": clamp,
                "score": g.get("score") or "fraction",
                "score_text": score_text(g),
                "tau": fmt(tau, 4, missing=NOT_RECORDED),
                "ratio_percentile": fmt(b.get("ratio_percentile"), 0, missing=NOT_RECORDED),
                "threshold_percentile": (
                    fmt(b.get("threshold_percentile"), 0, missing=None) if not calibration.get("target_fpr") else None
                ),
                "calibration_text": calibration_text(calibration),
                "rho_rows": [
                    r
                    for r in (_summary_row("forget", rho.get("forget")), _summary_row("retain", rho.get("retain")))
                    if r
                ],
                "heldout_forget": pct(held.get("forget_trigger_rate")),
                "heldout_retain": pct(held.get("retain_trigger_rate")),
                "heldout_n_forget": fmt(held.get("n_forget"), missing="?"),
                "heldout_n_retain": fmt(held.get("n_retain"), missing="?"),
                "has_heldout": finite_number(held.get("forget_trigger_rate")) is not None
                or finite_number(held.get("retain_trigger_rate")) is not None,
                "retain_trigger_rate": finite_number(held.get("retain_trigger_rate")),
                "features": _feature_rows(list(g.get("features") or []), fs, max_tokens),
                "has_feature_stats": bool(fs.get("features")),
            }
        )
    return views


# ----------------------------------------------------------------------------------- evaluation
def _results_view(report: dict) -> dict:
    """The results table: base, DSG, DSG − base, then one column per baseline; a model column only where
    some row has a number for it."""
    rows = report.get("results") or []
    columns = [
        (k, h) for k, h in model_columns(report) if any(finite_number(row_value(r, k)) is not None for r in rows)
    ]
    keys = [k for k, _ in columns]
    delta = "base" in keys and "dsg" in keys
    split = sum(k in MODELS for k in keys)  # base and DSG come first, the baselines after "DSG − base"
    header = (
        [h for _, h in columns[:split]] + (["DSG − base"] if delta else []) + [md_cell(h) for _, h in columns[split:]]
    )
    results = []
    for r in rows:
        arrow = {True: " ↑", False: " ↓"}.get(r.get("higher_is_better"), "")
        cells = [fmt(row_value(r, k)) for k in keys]
        if delta:
            cells.insert(split, fmt_delta(r.get("base"), r.get("dsg"), NOT_MEASURED))
        results.append(
            {
                "dataset": md_cell(r["dataset"]),
                "metric": md_cell(f"{r['metric']}{arrow}"),
                "n": fmt(r.get("n"), missing=""),
                "cells": cells,
            }
        )
    sources = report.get("baseline_models") or {}
    baselines = [
        {"name": md_cell(name), "source": short_source(sources[name]) if name in sources else None}
        for name in report.get("baselines") or []
    ]
    return {
        "results_header": header,
        "results": results,
        "show_n": any(r["n"] for r in results),
        "baselines": baselines,
    }


def _trigger_view(report: dict, guardrail_names: list[str]) -> dict:
    rates = report.get("trigger_rates") or {}
    names = list(guardrail_names) or sorted({g for per_guard in rates.values() for g in per_guard})
    rows = []
    for dataset, per_guard in rates.items():
        cells = []
        for g in names:
            value = per_guard.get(g) or {}
            rate = finite_number(value.get("rate"))
            cells.append(pct(rate) + (f" of {value['n']}" if rate is not None else ""))
        rows.append({"dataset": md_cell(dataset), "cells": cells})
    return {"trigger_header": names, "trigger_rows": rows}


PLACEMENT_PHRASES = {
    "prefix": "in front of the prompt (prefix)",
    "suffix": "after it (suffix)",
    "split": "between its two halves of tokens (split)",
}


def _dilution_view(report: dict) -> dict | None:
    """The dilution table and the Limitations sentence's parts; None without a dilution block. One table
    row per guardrail and placement (`show_placement`), or per guardrail for a block with filler in front only
    (reports written before placements existed: the table they always had)."""
    block = report.get("dilution")
    if not block:
        return None
    placements = dilution_placements(block)
    rows, lines = [], []
    for row in dilution_rows(block):
        name, score = md_cell(row["guardrail"]), md_cell(row["score"])
        none_fired = row["fired_before"] == 0  # attack success is null: nothing to evade
        fired = f"{pct(row['undiluted_trigger_rate'])} ({row['fired_before']} of {row['n']})"
        for placement, steps in row["by_placement"]:
            rows.append(
                {
                    "guardrail": name,
                    "score": score,
                    "fired": fired,
                    "placement": placement,
                    "cells": ["none fired" if none_fired else pct(v) for _, v in steps],
                }
            )
        if not none_fired:
            steps = ", ".join(f"{key}: {pct(v)}" for key, v in row["attack_success"])
            lines.append(f"guardrail `{name}` (score `{score}`): {steps}")
    where = (
        "put in front"
        if placements == ["prefix"]
        else "put "
        + ", ".join(PLACEMENT_PHRASES[p] for p in placements[:-1])
        + (" or " if len(placements) > 1 else "")
        + PLACEMENT_PHRASES[placements[-1]]
        + ","
    )
    return {
        "dataset": md_cell(block["dataset"]),
        "filler": md_cell(block["filler"]),
        "n": block["n"],
        "factors": [factor_key(f) for f in block["factors"]],
        "placements": placements,
        "show_placement": placements != ["prefix"],
        "where": where,
        "rows": rows,
        "lines": lines,
    }


def _fluency_view(report: dict) -> dict | None:
    """What a fired answer looks like (`dsg eval --fluency`): per prompt set, the base's answers and the DSG
    model's side by side (NLL under the base, distinct-2, answer leak) and the first example; None without it."""
    block = report.get("fluency")
    if not isinstance(block, dict) or not isinstance(block.get("sets"), dict):
        return None
    rows, examples = [], []
    for label, entry in block["sets"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("dsg"), dict):
            continue
        for who, name in (("base", "base"), ("dsg", "DSG")):
            m = entry.get(who) or {}
            rows.append(
                {
                    "set": md_cell(label),
                    "n": entry.get("n"),
                    "model": name,
                    "nll": fmt_number(m.get("nll_per_token"), missing=NOT_MEASURED),
                    "distinct": fmt_number(m.get("distinct_2"), missing=NOT_MEASURED),
                    "leak": pct(m.get("answer_leak_rate")),
                }
            )
        for x in (entry.get("examples") or [])[:1]:
            examples.append(
                {
                    "set": md_cell(label),
                    "question": _short(x.get("question", ""), 120),
                    "base": _short(x.get("base", ""), 160),
                    "dsg": _short(x.get("dsg", ""), 160),
                    "fired": bool(x.get("fired")),
                }
            )
    settings = block.get("settings") or {}
    if not rows:
        return None
    return {
        "rows": rows,
        "examples": examples,
        "tokens": settings.get("max_new_tokens"),
        "prompt": settings.get("prompt"),
    }


def eval_view(report: dict, guardrail_names: list[str]) -> dict:
    """The evaluation section (a report checked by `report_schema.check_report`): the results table with
    the baselines, the trigger-rate table, the dilution table and sentence, what fired answers look like; all
    numbers formatted."""
    return {
        **_results_view(report),
        **_trigger_view(report, guardrail_names),
        "dilution": _dilution_view(report),
        "fluency": _fluency_view(report),
    }


def eval_results(report: dict, model_name: str) -> list:
    """`EvalResult`s for the model-index: the DSG model's value of every results row."""
    from huggingface_hub import EvalResult

    out = []
    for r in report.get("results") or []:
        if not isinstance(r, dict) or finite_number(r.get("dsg")) is None or "dataset" not in r or "metric" not in r:
            continue
        out.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=str(r.get("dataset_id") or r["dataset"]),
                dataset_name=str(r["dataset"]),
                dataset_config=r.get("dataset_config"),
                dataset_split=r.get("dataset_split"),
                metric_type=str(r["metric"]),
                metric_name=f"{r['metric']} ({model_name})",
                metric_value=finite_number(r["dsg"]),
            )
        )
    return out


def _hub_datasets(build: dict) -> list[str]:
    """Forget/retain sources that are Hub data set ids (`NAME[:CONFIG][@SPLIT]`), for the metadata."""
    ids = []
    for g in build.get("guardrails") or []:
        for spec in list(g.get("forget_sources") or []) + list(g.get("retain_sources") or []):
            name = str(spec).split("@")[0].split(":")[0]
            if is_repo_id(name) and not Path(str(spec)).exists() and name not in ids:
                ids.append(name)
    return ids


# ------------------------------------------------------------------------------------------ card
def card_context(
    model_dir, repo_id: str | None = None, *, eval_dir=None, base_model: str | None = None, license: str | None = None
) -> tuple[dict, dict]:
    """(metadata kwargs for `ModelCardData`, template variables) for a model folder."""
    folder = load_folder(model_dir, eval_dir)
    config, build, report = folder["config"], folder["build"], folder["report"]
    model_name = repo_id.split("/")[-1] if repo_id else Path(model_dir).resolve().name
    base = resolve_base(config, build, base_model, license)
    views = guardrail_views(config, folder["features"], build)
    ev = eval_view(report, [v["name"] for v in views]) if report else None
    results = eval_results(report, model_name) if report else []
    metadata = {
        "base_model": base["hub_id"],
        "library_name": "transformers",
        "license": base["license"],
        "tags": list(TAGS),
        "pipeline_tag": "text-generation",
        "datasets": _hub_datasets(build) or None,
        "model_name": model_name,
        "eval_results": results or None,
    }
    topics = [v["name"] for v in views]
    variables = {
        **action_variables(views),
        "model_id": model_name,
        "repo_id": repo_id or "OWNER/NAME",
        "base": base,
        "topics": topics,
        "topics_text": ", ".join(f"**{t}**" for t in topics) or NOT_RECORDED,
        "guardrails": views,
        "any_dynamic": any(v["dynamic"] for v in views),
        "any_static": any(not v["dynamic"] for v in views),
        "has_chat_template": folder["has_chat_template"],
        "eval": ev,
        "plots": [f"eval/{p}" for p in folder["plots"]],
        "paper": PAPER,
        "not_measured": NOT_MEASURED,
        "has_build": bool(build),
        "has_features": bool(folder["features"]),
        "transformers_range": supported_transformers(),
        "max_retain_trigger": pct(
            max((v["retain_trigger_rate"] for v in views if v["retain_trigger_rate"] is not None), default=None)
        ),
    }
    return metadata, variables


def action_variables(views: list[dict]) -> dict:
    """The template's action-dependent sentences: which actions the guardrails take (`any_clamp`, `any_refuse`,
    `any_monitor`), the intro's `goal` and `intro_action`, and `false_positive_text` for Limitations."""
    actions = {v["action"] for v in views} or {"clamp"}
    effects = {
        "clamp": "the topic's SAE features are clamped to a negative value",
        "refuse": "the model answers with a fixed refusal instead",
        "monitor": "the decision is reported and nothing is edited (monitor)",
    }
    intro = [effects.get(a, f"action `{a}` acts") for a in ACTIONS if a in actions]
    intro += [f"action `{a}` acts" for a in sorted(actions - set(effects))]
    harms = {
        frozenset(): None,
        frozenset({"clamp"}): "that answer is edited, and degraded if the clamp is large",
        frozenset({"refuse"}): "that prompt is refused",
        frozenset({"clamp", "refuse"}): "that answer is edited (`clamp`) or refused (`refuse`)",
    }
    harm = harms[frozenset(actions & {"clamp", "refuse"})]
    return {
        "any_clamp": "clamp" in actions,
        "any_refuse": "refuse" in actions,
        "any_monitor": "monitor" in actions,
        "goal": "detect, without editing anything, prompts about"
        if actions == {"monitor"}
        else "suppress its knowledge of",
        "intro_action": intro[0]
        if len(intro) == 1
        else "it acts as each guardrail's action says: " + ", or ".join(intro),
        "false_positive_text": harm
        or (
            "nothing changes for the user (monitor), but the reported decision counts a "
            "prompt that was not about the topic"
        ),
    }


def supported_transformers() -> str:
    """The transformers range the model code is tested on: this package's own requirement (pyproject.toml,
    checked at both ends by .ci/compat.py), read from the installed metadata."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        found = [Requirement(r) for r in requires("modeling_dsg") or []]
    except PackageNotFoundError:
        found = []
    spec = next((r.specifier for r in found if r.name == "transformers"), None)
    return ", ".join(sorted((str(s) for s in spec), key=lambda s: not s.startswith(">"))) if spec else NOT_RECORDED


def default_template() -> Path:
    """The model-card template the package ships (`modeling_dsg/publishing/templates/dsg_model_card.md`)."""
    return TEMPLATE_PATH


def render_card(
    model_dir,
    repo_id: str | None = None,
    *,
    eval_dir=None,
    base_model: str | None = None,
    license: str | None = None,
    template_path=None,
):
    """Render the model card of a DSG model folder as a `huggingface_hub.ModelCard`.

    Args:
        model_dir: the folder written by `dsg build` (must hold a config.json with model_type "dsg").
        repo_id: the Hub repo it goes to (OWNER/NAME), used in the title and usage snippets.
        eval_dir: folder with the `dsg eval` report.json and plots (default `<model_dir>/eval`).
        base_model: the base model's Hub id, when the folder only records a local path.
        license: the license id, overriding the one found for the base model.
        template_path: a Jinja template (default `modeling_dsg/publishing/templates/dsg_model_card.md`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    metadata, variables = card_context(model_dir, repo_id, eval_dir=eval_dir, base_model=base_model, license=license)
    template = Path(template_path) if template_path is not None else default_template()
    if not template.is_file():
        raise DSGError(f"model card template {template} not found")
    data = ModelCardData(**{k: v for k, v in metadata.items() if v is not None})
    return ModelCard.from_template(data, template_path=str(template), **variables)
