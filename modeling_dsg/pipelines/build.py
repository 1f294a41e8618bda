"""`dsg build`: from a base model, an SAE and forget/retain corpora to an unlearned DSG model folder.

The path (defaults are the paper's unless said otherwise):

1. Corpora to token rows (`rows.build_rows`): documents longer than 50 characters, up to 1024 per
   corpus, joined with EOS into rows of `seq_len` tokens with BOS at position 0 (`--no-packing`: one
   document per row, padded). Forget and retain get equal row counts (seeded), and a seeded
   `heldout_fraction` (default 0.2) of each is set aside, never used for selection or calibration
   (0: no held-out rows; the held-out trigger rates are then recorded as null).
2. The statistics pass (`stats.collect`): a forward that stops after block `layer`, the SAE's
   activations per token, per-feature mean activation and firing frequency on forget and on retain.
   Tokens counted are those the guard counts at run time: not padding, not BOS.
3. Selection (`selection.select_dynamic` / `select_static`), see that module for every formula.
4. Calibration: tau = the `threshold_percentile`-th percentile of rho over the retain rows; the
   trigger rates on the held-out forget and retain rows are measured with that tau (static mode is
   always on: tau = 0, and a row "fires" when any selected feature is active in it, rho > 0).
5. The model folder: the base weights, the SAE, the guardrail config, the tokenizer, `features.json`
   (each selected feature's statistics and top-activating tokens in context) and `dsg_build.json`
   (sources, options, rho summaries, held-out trigger rates, timings). Written atomically.

`--add-to DIR` stacks a new guardrail on an existing DSG model: the statistics pass then runs through
that model with its guardrails active (as deployed), and the existing guardrails are not touched.

`--action clamp|refuse|monitor` (configuration_dsg.ACTIONS) is what the new guardrail does when it fires
(stacked guardrails may differ): clamp (the paper's edit, the default), refuse (the continuation is
`--refusal TEXT`, default configuration_dsg.DEFAULT_REFUSAL, then end of sequence; the text is tokenized
with the model's tokenizer, add_special_tokens=False, into the config's `refusal_ids`) or monitor (decide,
edit nothing). Selection and calibration do not depend on the action; dsg_build.json records it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import DSGError

BUILD_FILE = "dsg_build.json"
FEATURES_FILE = "features.json"


@dataclass
class BuildOptions:
    """Every knob of a build, with the paper's defaults."""

    name: str = "forget"  # the topic; unique within a model
    mode: str = "dynamic"  # "dynamic" (DSG) or "static" (seed baseline)
    layer: int | None = None  # default: the layer in the SAE's hook name
    n_features: int = 20  # N
    clamp: float = 500.0  # c: selected features are set to -c
    ratio_percentile: float = 95.0  # dynamic: keep features with forget/retain ratio >= this percentile
    importance_percentile: float = 5.0  # dynamic: and forget importance >= this percentile
    static_retain_freq: float = 0.01  # static: drop features firing on >= this fraction of retain tokens
    threshold_percentile: float = 95.0  # tau = this percentile of rho over retain rows (the paper's rule)
    target_fpr: float | None = None  # instead: the smallest tau whose retain firing rate has a one-sided 95%
    # Clopper-Pearson upper bound <= target_fpr (selection.calibrate_fpr)
    score: str = "fraction"  # "fraction" (the paper's rho) or "window" (dilution-robust)
    window: int = 32  # window size for score "window"
    action: str = "clamp"  # what a fired guardrail does: configuration_dsg.ACTIONS
    refusal: str | None = None  # action "refuse": the refusal text (None: configuration_dsg.DEFAULT_REFUSAL)
    seq_len: int = 1024
    min_chars: int = 50
    max_docs: int | None = 1024
    packing: bool = True
    heldout_fraction: float = 0.2
    batch_size: int = 8
    seed: int = 0
    top_tokens: int = 8  # top-activating tokens kept per feature in features.json
    slim: bool = False
    device: str = "cpu"
    measure_speedup: bool = False  # time the truncated forward against a full forward (one batch)


@dataclass
class GuardrailBuild:
    """What one build produced, before it is written to a folder."""

    guardrail: dict
    sae_state: dict
    features: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- SAE
def guardrail_sae(sae, source: str) -> tuple[dict, dict]:
    """A sae-lens SAE as our guardrail `sae` dict plus its tensors (same names as sae-lens)."""
    cfg = sae.cfg
    arch = cfg.architecture()
    if arch not in ("standard", "jumprelu", "topk", "gated"):
        raise DSGError(f"SAE architecture {arch!r} is not supported (standard, jumprelu, topk, gated)")
    if getattr(cfg, "normalize_activations", "none") not in ("none", "constant_norm_rescale", "layer_norm"):
        raise DSGError(
            f"SAE input normalisation {cfg.normalize_activations!r} is not supported; fold it into "
            "the weights first (sae-lens: fold_activation_norm_scaling_factor)"
        )
    spec = {
        "architecture": arch,
        "d_in": int(cfg.d_in),
        "d_sae": int(cfg.d_sae),
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": getattr(cfg, "normalize_activations", "none"),
        "source": source,
    }
    if arch == "topk":
        spec["k"] = int(cfg.k)
        spec["rescale_acts_by_decoder_norm"] = bool(getattr(cfg, "rescale_acts_by_decoder_norm", False))
    from ..runtime.configuration_dsg import validate_sae

    try:  # the bounds a guardrail config will check (sizes, k), before any work
        validate_sae({**spec, "slim": False, "source": None}, f"SAE {source}")
    except ValueError as err:
        raise DSGError(str(err).removeprefix("DSG config: ")) from None
    names = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold", "b_gate", "b_mag", "r_mag"}
    state = {k: v.detach().float().cpu() for k, v in sae.state_dict().items() if k in names}
    return spec, state


def _check_layer(model, layer: int | None, sae_layer: int | None) -> int:
    from ..runtime.modeling_dsg import decoder_layers

    n_layers = len(decoder_layers(model))
    if layer is None:
        layer = sae_layer
    if layer is None:
        raise DSGError("cannot tell the SAE's layer from its hook name; pass --layer")
    if not 0 <= layer < n_layers:
        raise DSGError(f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return layer


# -------------------------------------------------------------------------------- the build
def _texts(specs, text_field=None) -> tuple[list[str], list[str]]:
    from ..data.sources import load_texts

    if isinstance(specs, (str, Path)):
        specs = [specs]
    texts = []
    for spec in specs:
        texts += load_texts(str(spec), text_field=text_field)
    return texts, [str(s) for s in specs]


def _corpus_step(corpus: str, step, *args, **kwargs):
    """Run a row-building step; a DSGError from it names the corpus (forget or retain) it is about."""
    try:
        return step(*args, **kwargs)
    except DSGError as err:
        raise DSGError(f"{corpus} corpus: {err}") from None


def _check_options(options: BuildOptions) -> None:
    """Refuse bad numeric options before anything is loaded (not after a long statistics pass)."""
    from ..runtime.configuration_dsg import ACTIONS, MAX_CLAMP, MAX_WINDOW

    checks = [
        (
            isinstance(options.name, str) and options.name.strip() != "",
            f"--name must be a non-empty topic name, got {options.name!r}",
        ),
        (options.mode in ("dynamic", "static"), f"unknown mode {options.mode!r} (dynamic or static)"),
        (options.n_features >= 1, f"--n-features must be at least 1, got {options.n_features}"),
        (
            options.clamp > 0 and options.clamp != float("inf"),
            f"--clamp must be a finite number > 0, got {options.clamp}",
        ),
        (
            options.clamp <= MAX_CLAMP,
            f"--clamp must be at most {MAX_CLAMP:g} (the model config's bound; the paper uses "
            f"500), got {options.clamp:g}",
        ),
        (
            0 < options.static_retain_freq <= 1,
            f"--static-retain-freq must be in (0, 1], got {options.static_retain_freq}",
        ),
        (0 <= options.heldout_fraction < 1, f"--heldout-fraction must be in [0, 1), got {options.heldout_fraction}"),
        (options.seq_len >= 2, f"--seq-len must be at least 2, got {options.seq_len}"),
        (options.batch_size >= 1, f"--batch-size must be at least 1, got {options.batch_size}"),
        (options.max_docs is None or options.max_docs >= 1, f"--max-docs must be at least 1, got {options.max_docs}"),
        (options.layer is None or options.layer >= 0, f"--layer must be >= 0, got {options.layer}"),
        (options.score in ("fraction", "window"), f"unknown --score {options.score!r} (fraction or window)"),
        (2 <= options.window <= MAX_WINDOW, f"--window must be between 2 and {MAX_WINDOW}, got {options.window}"),
        (options.action in ACTIONS, f"unknown --action {options.action!r} (one of {', '.join(ACTIONS)})"),
        (
            options.refusal is None or options.action == "refuse",
            f"--refusal is only valid with --action refuse (the action is {options.action!r})",
        ),
        (
            options.refusal is None or (isinstance(options.refusal, str) and options.refusal.strip() != ""),
            f"--refusal must be a non-empty text, got {options.refusal!r}",
        ),
    ]
    if options.target_fpr is not None:
        checks.append((0 < options.target_fpr < 1, f"--target-fpr must be between 0 and 1, got {options.target_fpr}"))
    for flag in ("ratio_percentile", "importance_percentile", "threshold_percentile"):
        value = getattr(options, flag)
        checks.append((0 <= value <= 100, f"--{flag.replace('_', '-')} must be between 0 and 100, got {value}"))
    for ok, message in checks:
        if not ok:
            raise DSGError(message)


def check_sae_options(options: BuildOptions, d_sae: int, flag: str = "--n-features") -> None:
    """Options that depend on the SAE: N cannot exceed its number of features."""
    if options.n_features > d_sae:
        raise DSGError(
            f"{flag} {options.n_features} is more than the SAE has features (d_sae = {d_sae}); pass at most {d_sae}"
        )


def refusal_token_ids(tokenizer, text: str, vocab_size: int | None) -> list[int]:
    """The refusal's token ids in the model's tokenizer (add_special_tokens=False); a `DSGError` when it
    tokenizes to nothing or to an id the model's vocabulary (`vocab_size`) does not have."""
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise DSGError(f"--refusal {text!r} tokenizes to no tokens")
    bad = [i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
    if bad:
        raise DSGError(
            f"--refusal {text!r}: token id {bad[0]} is outside the model's vocabulary (size {vocab_size}); "
            "the tokenizer does not match the model"
        )
    return ids


def refusal_for(options: BuildOptions, tokenizer, vocab_size: int | None) -> tuple[str, list[int]] | None:
    """(refusal text, its token ids) for action "refuse" (`options.refusal`, default DEFAULT_REFUSAL); else None."""
    if options.action != "refuse":
        return None
    from ..runtime.configuration_dsg import DEFAULT_REFUSAL

    text = options.refusal if options.refusal is not None else DEFAULT_REFUSAL
    return text, refusal_token_ids(tokenizer, text, vocab_size)


def model_vocab_size(model) -> int | None:
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def check_refusal(model, tokenizer, options: BuildOptions) -> None:
    """--action refuse: the refusal tokenizes into the model's vocabulary and the model has an end-of-sequence
    token to end it with; checked before the statistics pass."""
    if options.action != "refuse":
        return
    refusal_for(options, tokenizer, model_vocab_size(model))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos is None or eos == []:
        raise DSGError(
            "--action refuse needs the model's eos_token_id (a refusal ends with end of sequence); "
            "its config and generation config have none"
        )


def _token_text(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _feature_report(index, stats, store, rows, tokenizer, k, context=12) -> dict:
    """features.json entry for one feature: statistics and top-activating tokens with their context."""
    top = []
    for row, pos, value in store.top_activations(index, k):
        ids = rows.input_ids[row]
        left = _token_text(tokenizer, ids[max(0, pos - context) : pos].tolist())
        token = _token_text(tokenizer, [int(ids[pos])])
        right = _token_text(tokenizer, ids[pos + 1 : pos + 4].tolist())
        top.append(
            {
                "token": token,
                "activation": round(float(value), 4),
                "context": f"{left}[[{token}]]{right}".replace("\n", " "),
            }
        )
    return {
        "index": int(index),
        "forget_mean": float(stats.forget_mean[index]),
        "retain_mean": float(stats.retain_mean[index]),
        "forget_freq": float(stats.forget_freq[index]),
        "retain_freq": float(stats.retain_freq[index]),
        "importance": float(stats.importance_forget[index]),
        "ratio": float(stats.ratio[index]),
        "top_tokens": top,
    }


@dataclass
class Statistics:
    """What one statistics pass produced: everything selection and calibration need, for any options
    that share its rows (so `dsg sweep` runs the pass once for a whole grid)."""

    layer: int
    sae_spec: dict
    sae_state: dict
    forget_rows: object  # rows.Rows of the forget build split (for features.json)
    stores: dict  # "forget", "retain" (+ "heldout forget", "heldout retain")
    stats: object  # selection.FeatureStats of forget vs retain
    timings: dict = field(default_factory=dict)
    options: object = None  # the BuildOptions of the pass
    vocab_size: int | None = None  # the model's vocabulary size (bounds a refusal's token ids)


def gather_statistics(
    model,
    tokenizer,
    sae,
    forget_texts,
    retain_texts,
    options: BuildOptions,
    sae_source: str = "",
    sae_layer: int | None = None,
) -> Statistics:
    """Rows, then one forward through block `layer` that stores every counted token's SAE activations."""
    import torch

    from ..analysis import selection
    from ..analysis.stats import collect, full_forward_speedup
    from ..data import rows as rows_mod

    _check_options(options)
    hidden = model.config.get_text_config().hidden_size
    spec, state = guardrail_sae(sae, sae_source)
    if spec["d_in"] != hidden:
        raise DSGError(f"the SAE's d_in ({spec['d_in']}) does not match the model's hidden size ({hidden})")
    layer = _check_layer(model, options.layer, sae_layer)
    timings = {}

    start = time.perf_counter()
    kw = dict(
        seq_len=options.seq_len,
        min_chars=options.min_chars,
        max_docs=options.max_docs,
        packing=options.packing,
        seed=options.seed,
    )
    forget = _corpus_step("forget", rows_mod.build_rows, forget_texts, tokenizer, **kw)
    retain = _corpus_step("retain", rows_mod.build_rows, retain_texts, tokenizer, **kw)
    forget, retain = rows_mod.balance(forget, retain, seed=options.seed)
    forget, forget_held = _corpus_step("forget", rows_mod.split, forget, options.heldout_fraction, seed=options.seed)
    retain, retain_held = _corpus_step(
        "retain", rows_mod.split, retain, options.heldout_fraction, seed=options.seed + 1
    )
    timings["rows_s"] = time.perf_counter() - start

    # The full SAE, in our plain-torch form, encodes for the statistics pass (same math as at run time).
    encode = sae_encoder(spec, state, layer, options.device)
    kw = dict(
        batch_size=options.batch_size, ignore_token_ids=counted_exclusions(model, tokenizer), device=options.device
    )

    start = time.perf_counter()
    corpora = [("forget", forget), ("retain", retain)]
    if len(forget_held):  # heldout_fraction = 0: no held-out rows, no held-out trigger rates
        corpora += [("heldout forget", forget_held), ("heldout retain", retain_held)]
    with torch.no_grad():
        stores = {
            name: collect(model, layer, encode, rows, desc=f"statistics: {name}", **kw) for name, rows in corpora
        }
    timings["statistics_s"] = time.perf_counter() - start
    tokens = sum(s.n_tokens for s in stores.values())
    timings["statistics_tokens"] = tokens
    timings["statistics_tokens_per_s"] = tokens / max(timings["statistics_s"], 1e-9)
    if options.measure_speedup:
        timings["truncated_forward"] = full_forward_speedup(
            model,
            layer,
            forget.select(torch.arange(min(len(forget), options.batch_size))),
            batch_size=options.batch_size,
            device=options.device,
        )
    start = time.perf_counter()
    stats = selection.FeatureStats.from_stores(stores["forget"], stores["retain"])
    timings["feature_stats_s"] = time.perf_counter() - start
    return Statistics(layer, spec, state, forget, stores, stats, timings, options, vocab_size=model_vocab_size(model))


def sae_encoder(spec: dict, state: dict, layer: int, device):
    """The full SAE's encode, in our plain-torch form (the same math as the guard at run time)."""
    from ..runtime.guard_dsg import DSGGuard

    probe = DSGGuard(
        {
            "name": "probe",
            "layer": layer,
            "mode": "dynamic",
            "features": [0],
            "clamp": 1.0,
            "threshold": 0.0,
            "score": "fraction",
            "sae": {**spec, "slim": False},
        },
        0,
    )
    probe.sae.load_state_dict(state)
    return probe.to(device).sae.encode


def counted_exclusions(model, tokenizer) -> list[int]:
    """Token ids the guard does not count (BOS), so statistics count exactly what the guard counts."""
    bos = getattr(model.config.get_text_config(), "bos_token_id", None)
    if bos is None:
        bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return list(bos) if isinstance(bos, (list, tuple)) else [int(bos)]


def select_and_calibrate(statistics: Statistics, options: BuildOptions) -> tuple[list[int], float, dict, dict]:
    """Features and tau for `options` from a statistics pass: (features, tau, rho per store, timings)."""
    from ..analysis import selection

    _check_options(options)
    check_sae_options(options, statistics.sae_spec["d_sae"])
    stats, stores = statistics.stats, statistics.stores
    start = time.perf_counter()
    if options.mode == "dynamic":
        features = selection.select_dynamic(
            stats, options.n_features, options.ratio_percentile, options.importance_percentile
        )
    else:
        features = selection.select_static(stats, options.n_features, options.static_retain_freq)
    timings = {"selection_s": time.perf_counter() - start}
    start = time.perf_counter()
    rho = {name: store.row_scores(features, options.score, options.window) for name, store in stores.items()}
    if options.mode != "dynamic":
        tau = 0.0
    elif options.target_fpr is not None:
        tau = selection.calibrate_fpr(rho["retain"], options.target_fpr)[0]
    else:
        tau = selection.calibrate_threshold(rho["retain"], options.threshold_percentile)
    timings["calibration_s"] = time.perf_counter() - start
    return features, float(tau), rho, timings


def calibration_record(retain_rho, tau: float, options: BuildOptions) -> dict:
    """How tau was chosen, and the retain firing rate at tau with its one-sided 95% Clopper-Pearson upper
    bound (the false-positive guarantee, reported whichever rule chose tau)."""
    from ..analysis import selection

    n = int(retain_rho.numel())
    fired = int((retain_rho > tau).sum())
    rule = (
        {"rule": "target_fpr", "target_fpr": options.target_fpr}
        if options.target_fpr is not None
        else {"rule": "percentile", "threshold_percentile": options.threshold_percentile}
    )
    return {
        **rule,
        "retain_rows": n,
        "retain_fired": fired,
        "retain_fpr": fired / max(n, 1),
        "retain_fpr_upper95": selection.clopper_pearson_upper(fired, n) if n else 1.0,
    }


def heldout_summary(rho: dict, tau: float, statistics: Statistics) -> dict:
    """Held-out trigger rates and AUROC (static mode is always on: it "fires" wherever rho > 0)."""
    from ..analysis import selection

    stores = statistics.stores
    heldout = {
        "forget_trigger_rate": None,
        "retain_trigger_rate": None,
        "n_forget": stores["heldout forget"].n_rows if "heldout forget" in stores else 0,
        "n_retain": stores["heldout retain"].n_rows if "heldout retain" in stores else 0,
        "auroc": None,
    }
    if "heldout forget" in rho:
        heldout.update(
            forget_trigger_rate=selection.trigger_rate(rho["heldout forget"], tau),
            retain_trigger_rate=selection.trigger_rate(rho["heldout retain"], tau),
            auroc=selection.auroc(rho["heldout forget"], rho["heldout retain"]),
        )
    return heldout


def guardrail_from(
    statistics: Statistics,
    features: list[int],
    tau: float,
    options: BuildOptions,
    refusal: tuple[str, list[int]] | None = None,
) -> dict:
    """The guardrail config; `refusal` (text, token ids: `refusal_for`) is needed for action "refuse"."""
    guardrail = {
        "name": options.name,
        "layer": statistics.layer,
        "mode": options.mode,
        "features": list(features),
        "clamp": float(options.clamp),
        "threshold": float(tau),
        "score": options.score,
        "action": options.action,
        "sae": {**statistics.sae_spec, "slim": False},
    }
    if options.score == "window":
        guardrail["window"] = options.window
    if options.action == "refuse":
        if refusal is None:
            raise DSGError("action 'refuse' needs the refusal's text and token ids (build.refusal_for)")
        guardrail["refusal"], guardrail["refusal_ids"] = refusal[0], list(refusal[1])
    return guardrail


def build_guardrail(
    model,
    tokenizer,
    sae,
    forget_texts,
    retain_texts,
    options: BuildOptions,
    sae_source: str = "",
    sae_layer: int | None = None,
) -> GuardrailBuild:
    """Select features and calibrate tau for one topic. `model` is the base (or a DSG model for --add-to)."""
    statistics = gather_statistics(model, tokenizer, sae, forget_texts, retain_texts, options, sae_source, sae_layer)
    return guardrail_build(statistics, options, tokenizer, sae_source)


def guardrail_build(statistics: Statistics, options: BuildOptions, tokenizer, sae_source: str = "") -> GuardrailBuild:
    """The GuardrailBuild (guardrail, SAE tensors, features.json entries, dsg_build.json record) for `options`."""
    from ..analysis import selection

    refusal = refusal_for(options, tokenizer, statistics.vocab_size)
    features, tau, rho, timings = select_and_calibrate(statistics, options)
    timings = {**statistics.timings, **timings}
    stores = statistics.stores
    report = [
        _feature_report(i, statistics.stats, stores["forget"], statistics.forget_rows, tokenizer, options.top_tokens)
        for i in features
    ]
    info = {
        "name": options.name,
        "mode": options.mode,
        "action": options.action,
        **({"refusal": refusal[0], "refusal_ids": refusal[1]} if refusal else {}),
        "sae": sae_source,
        "layer": statistics.layer,
        "n_features": len(features),
        "clamp": float(options.clamp),
        "ratio_percentile": options.ratio_percentile,
        "importance_percentile": options.importance_percentile,
        "threshold_percentile": options.threshold_percentile,
        "tau": float(tau),
        "calibration": calibration_record(rho["retain"], tau, options),
        "rows": {
            "forget": stores["forget"].n_rows,
            "retain": stores["retain"].n_rows,
            "seq_len": statistics.forget_rows.seq_len,
            "packing": options.packing,
        },
        "tokens": {name: store.n_tokens for name, store in stores.items()},
        "rho": {name.replace(" ", "_"): selection.summarize(r) for name, r in rho.items()},
        "heldout": heldout_summary(rho, tau, statistics),
        "timings": timings,
        "options": asdict(options),
    }
    return GuardrailBuild(
        guardrail_from(statistics, features, tau, options, refusal), statistics.sae_state, report, info
    )


def assemble(base, tokenizer, builds: list[GuardrailBuild], existing=None):
    """A `DSGForCausalLM` holding `base` (or the `existing` DSG model) plus the new guardrails."""
    import copy

    from .. import DSGConfig, DSGForCausalLM

    if existing is None:
        config = DSGConfig(text_config=base.config.to_dict(), guardrails=[])
        model = DSGForCausalLM(config, base_model=base)
        model.generation_config = copy.deepcopy(base.generation_config)
    else:
        model = existing
    for build in builds:
        try:
            model.add_guardrail(build.guardrail, build.sae_state)
        except ValueError as err:
            raise DSGError(str(err)) from None
    return model.eval()


# Keys that describe how a tokenizer was *loaded*, not the tokenizer: transformers 5 stores `is_local` and
# `local_files_only` in every tokenizer it loads from disk and writes them back on save (and `from_pretrained`
# keyword arguments end up there too). A Hub user must never inherit them: `local_files_only: true` would
# stop their tokenizer from fetching files.
TOKENIZER_LOAD_KEYS = (
    "is_local",
    "local_files_only",
    "_commit_hash",
    "_from_auto",
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "subfolder",
    "trust_remote_code",
    "code_revision",
    "gguf_file",
)


def context_length(config) -> int | None:
    """The base model's real context (`max_position_embeddings` of its text config), or None if it has none."""
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def save_tokenizer(tokenizer, out, config=None) -> dict:
    """`tokenizer.save_pretrained(out)`, with an ordinary tokenizer_config.json. Returns what it holds.

    The file names a concrete `tokenizer_class` (the base tokenizer's own class), carries none of the
    `TOKENIZER_LOAD_KEYS`, and its `model_max_length` is the model's real context (`context_length(config)`)
    where the tokenizer claims more (a tokenizer without a limit says 1e30). The tokenizer object is unchanged.
    """
    tokenizer.save_pretrained(out)
    path = Path(out) / "tokenizer_config.json"
    if not path.is_file():  # a tokenizer type that writes no tokenizer_config.json: nothing to clean
        return {}
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in TOKENIZER_LOAD_KEYS:
        cfg.pop(key, None)
    if not cfg.get("tokenizer_class"):
        cfg["tokenizer_class"] = type(tokenizer).__name__
    n = context_length(config)
    current = cfg.get("model_max_length")
    if n is not None and (not isinstance(current, (int, float)) or current > n):
        cfg["model_max_length"] = n
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return cfg


def write_folder(
    model,
    tokenizer,
    out: Path,
    builds: list[GuardrailBuild],
    base_spec: str,
    previous: dict | None = None,
    slim: bool = False,
):
    """Save the model, tokenizer, features.json and dsg_build.json into `out` (an empty folder)."""
    previous = previous or {}
    model.save_pretrained(out, slim=slim)
    save_tokenizer(tokenizer, out, model.config)
    features = previous.get("features") or {}
    features["guardrails"] = list(features.get("guardrails") or []) + [
        {
            "name": b.guardrail["name"],
            "layer": b.guardrail["layer"],
            "mode": b.guardrail["mode"],
            "features": b.features,
        }
        for b in builds
    ]
    (out / FEATURES_FILE).write_text(json.dumps(features, indent=2))
    record = previous.get("build") or {"base_model": base_spec}
    record["guardrails"] = list(record.get("guardrails") or []) + [
        {
            **b.info,
            "forget_sources": b.info.get("forget_sources", []),
            "retain_sources": b.info.get("retain_sources", []),
        }
        for b in builds
    ]
    (out / BUILD_FILE).write_text(json.dumps(record, indent=2))


def _read_previous(folder: Path) -> dict:
    previous = {}
    for key, name in (("features", FEATURES_FILE), ("build", BUILD_FILE)):
        data = read_record(Path(folder) / name)
        if data is not None:
            previous[key] = data
    return previous


# ------------------------------------------------------------------------------ features.json / dsg_build.json
def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _shown(value) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else _kind(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _objects(value, where: str) -> list:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        bad = value if not isinstance(value, list) else next(v for v in value if not isinstance(v, dict))
        raise DSGError(f"{where} must be a list of objects, got {_shown(bad)}")
    return value


def _typed(record: dict, key: str, types, what: str, where: str) -> None:
    """`record[key]`, when present and not null, is one of `types` (never a boolean)."""
    value = record.get(key)
    types = types if isinstance(types, tuple) else (types,)
    if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
        raise DSGError(f"{where}: {key!r} must be {what}, got {_shown(value)}")


def check_features_record(data, path) -> dict:
    """features.json in the shape `write_folder` writes (see cards.py); anything else is a `DSGError` naming it:
    {"guardrails": [{"name": str, "features": [{"index": int, ..., "top_tokens": [{"token": str, "activation":
    number, "context": str}]}]}]}. Returns `data`."""
    if not isinstance(data, dict):
        raise DSGError(f"{path} must hold a JSON object, got {_kind(data)}")
    for i, g in enumerate(_objects(data.get("guardrails", []), f"{path}: 'guardrails'")):
        where = f"{path}: guardrails[{i}]"
        if not isinstance(g.get("name"), str):
            raise DSGError(f"{where} needs a string 'name', got {_shown(g.get('name'))}")
        for j, f in enumerate(_objects(g.get("features", []), f"{where}: 'features'")):
            at = f"{where}: features[{j}]"
            index = f.get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                raise DSGError(f"{at}: 'index' must be an integer, got {_shown(index)}")
            for k, t in enumerate(_objects(f.get("top_tokens", []), f"{at} (#{index}): 'top_tokens'")):
                _typed(t, "token", str, "a string", f"{at}: top_tokens[{k}]")
                _typed(t, "context", str, "a string", f"{at}: top_tokens[{k}]")
                _typed(t, "activation", (int, float), "a number", f"{at}: top_tokens[{k}]")
    return data


def check_build_record(data, path) -> dict:
    """dsg_build.json in the shape `write_folder` writes (see cards.py); anything else is a `DSGError` naming
    it. Returns `data`."""
    if not isinstance(data, dict):
        raise DSGError(f"{path} must hold a JSON object, got {_kind(data)}")
    _typed(data, "base_model", str, "a string", str(path))
    for i, g in enumerate(_objects(data.get("guardrails", []), f"{path}: 'guardrails'")):
        where = f"{path}: guardrails[{i}]"
        _typed(g, "name", str, "a string", where)
        _typed(g, "sae", (str, dict), "a string or an object", where)
        _typed(g, "action", str, "a string", where)
        _typed(g, "refusal", str, "a string", where)
        for key in ("forget_sources", "retain_sources"):
            value = g.get(key)
            if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
                raise DSGError(f"{where}: {key!r} must be a list of strings, got {_shown(value)}")
        for key in ("heldout", "rho", "rows", "tokens", "timings", "options"):
            _typed(g, key, dict, "an object", where)
    return data


RECORD_CHECKS = {FEATURES_FILE: check_features_record, BUILD_FILE: check_build_record}


def read_record(path) -> dict | None:
    """features.json or dsg_build.json of a model folder, checked (None when the file is absent)."""
    from ..data.sources import read_json_file

    path = Path(path)
    if not path.exists():
        return None
    what = "feature file" if path.name == FEATURES_FILE else "build record"
    return RECORD_CHECKS[path.name](read_json_file(path, what), path)


def build(
    base: str | None,
    sae: str,
    forget,
    retain,
    out,
    *,
    options: BuildOptions | None = None,
    add_to: str | None = None,
    overwrite: bool = False,
    text_field: str | None = None,
) -> dict:
    """The Python API of `dsg build`. Returns the build record of the new guardrail."""
    from ..data.sources import load_base_model, load_sae, sae_layer
    from ..outputs import prepare_output
    from ..paths import atomic_output_dir

    options = options or BuildOptions()
    _check_options(options)
    out = prepare_output(
        out,
        overwrite,
        inputs={
            "the --base model": base,
            "the --sae folder": sae,
            "the --forget source": forget,
            "the --retain source": retain,
            "the --add-to folder": add_to,
        },
    )
    if add_to is None and base is None:
        raise DSGError("pass --base MODEL (or --add-to an existing DSG folder)")
    # The cheap inputs first (texts, SAE), so that a bad one fails before a large model is loaded.
    forget_texts, forget_specs = _texts(forget, text_field)
    retain_texts, retain_specs = _texts(retain, text_field)
    sae_obj = load_sae(sae, device="cpu")
    guardrail_sae(sae_obj, sae)  # an architecture the guard cannot run fails before the model is loaded
    check_sae_options(options, int(sae_obj.cfg.d_sae))
    existing, previous, tokenizer = None, {}, None
    if add_to is not None:
        existing, tokenizer, previous = _load_existing(add_to, options)
        model = existing
        base_spec = previous.get("build", {}).get("base_model", str(add_to))
    else:
        model, tokenizer = load_base_model(base, device=options.device)
        base_spec = base
    check_refusal(model, tokenizer, options)  # a refusal the model cannot write fails before the statistics pass
    result = build_guardrail(
        model, tokenizer, sae_obj, forget_texts, retain_texts, options, sae_source=sae, sae_layer=sae_layer(sae_obj)
    )
    result.info["forget_sources"], result.info["retain_sources"] = forget_specs, retain_specs
    model = assemble(model, tokenizer, [result], existing=existing)
    check_build_finite(model, [result])
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_folder(model, tokenizer, tmp, [result], base_spec, previous, slim=options.slim)
    return result.info


def check_build_finite(model, builds: list[GuardrailBuild]) -> None:
    """Nothing non-finite is written: the model's tensors, tau and every number of features.json."""
    import math

    from ..data.sources import check_finite

    check_finite(model.state_dict().items(), "the built model (nothing was written)")
    for b in builds:
        numbers = [("tau", b.guardrail.get("threshold"))] + [
            (f"feature #{f['index']} {key}", f.get(key))
            for f in b.features
            for key in ("forget_mean", "retain_mean", "forget_freq", "retain_freq", "importance", "ratio")
        ]
        for name, value in numbers:
            if isinstance(value, float) and not math.isfinite(value):
                raise DSGError(
                    f"guardrail {b.guardrail['name']!r}: {name} is {value} (the statistics are not "
                    "finite; nothing was written)"
                )


def _load_existing(folder, options):
    from ..data.sources import load_dsg_model, read_json_file

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise DSGError(f"--add-to {folder}: not a model folder (no config.json)")
    config = read_json_file(folder / "config.json", f"--add-to {folder}: model config")
    if not isinstance(config, dict):
        raise DSGError(f"--add-to {folder}: config.json must hold a JSON object, got {_kind(config)}")
    if config.get("model_type") != "dsg":
        raise DSGError(f"--add-to {folder}: not a DSG model (model_type {config.get('model_type')!r})")
    guardrails = config.get("guardrails", [])
    _objects(guardrails, f"--add-to {folder}: config.json's 'guardrails'")
    names = {g.get("name") for g in guardrails}
    if options.name in names:
        raise DSGError(f"--add-to {folder}: it already has a guardrail named {options.name!r}; pick another --name")
    previous = _read_previous(folder)  # a broken features.json or dsg_build.json fails before the model loads
    model, tokenizer, _ = load_dsg_model(folder, device=options.device, what=f"--add-to {folder}")
    return model, tokenizer, previous


# ------------------------------------------------------------------------------------- the CLI
def configure_parser(p, sweep: bool = False):
    """`dsg build`'s options; with `sweep`, those `dsg sweep` shares (the grid replaces mode, N, c, ratio)."""
    p.add_argument(
        "--base",
        required=sweep,
        metavar="MODEL",
        help="Hub id, local folder or .gguf file" + ("" if sweep else " (not needed with --add-to)"),
    )
    p.add_argument("--sae", required=True, metavar="SAE", help="sae-lens folder or RELEASE:SAE_ID")
    p.add_argument(
        "--forget",
        required=True,
        nargs="+",
        metavar="SRC",
        help=".txt/.jsonl/.parquet or Hub dataset NAME[:CONFIG][@SPLIT]",
    )
    p.add_argument("--retain", required=True, nargs="+", metavar="SRC", help="same kinds as --forget")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the sweep's report folder to write" if sweep else "the model folder to write",
    )
    if not sweep:
        p.add_argument("--add-to", metavar="DIR", help="stack a new guardrail on this existing DSG model folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d = BuildOptions()
    p.add_argument("--name", default=d.name, help="the topic (guardrail name)")
    p.add_argument("--layer", type=int, help="default: the SAE's hook layer")
    if not sweep:
        p.add_argument("--mode", choices=["dynamic", "static"], default=d.mode)
        p.add_argument("--n-features", type=int, default=d.n_features)
        p.add_argument("--clamp", type=float, default=d.clamp)
        p.add_argument("--ratio-percentile", type=float, default=d.ratio_percentile)
    p.add_argument("--importance-percentile", type=float, default=d.importance_percentile)
    p.add_argument("--static-retain-freq", type=float, default=d.static_retain_freq)
    p.add_argument(
        "--threshold-percentile",
        type=float,
        default=d.threshold_percentile,
        help="tau = this percentile of rho over retain rows (the paper's rule; default 95)",
    )
    p.add_argument(
        "--target-fpr",
        type=float,
        default=d.target_fpr,
        help="instead: the smallest tau whose retain firing rate has a one-sided 95%% Clopper-Pearson "
        "upper bound <= this (e.g. 0.02)",
    )
    if not sweep:
        from ..runtime.configuration_dsg import ACTIONS, DEFAULT_REFUSAL

        p.add_argument(
            "--action",
            choices=ACTIONS,
            default=d.action,
            help="what the guardrail does when it fires: clamp (the paper's edit), refuse (answer with "
            "--refusal, then end of sequence) or monitor (decide and report, edit nothing)",
        )
        p.add_argument(
            "--refusal", metavar="TEXT", help=f"with --action refuse: the refusal text (default {DEFAULT_REFUSAL!r})"
        )
    p.add_argument(
        "--score",
        choices=["fraction", "window"],
        default=d.score,
        help="rho: the flagged fraction of the sequence (paper) or its maximum over --window tokens",
    )
    p.add_argument("--window", type=int, default=d.window)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--min-chars", type=int, default=d.min_chars)
    p.add_argument("--max-docs", type=int, default=d.max_docs)
    p.add_argument(
        "--no-packing", dest="packing", action="store_false", help="one document per row instead of EOS-joined chunks"
    )
    p.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--text-field", help="the JSONL/parquet field holding the text")
    if not sweep:
        p.add_argument("--slim", action="store_true", help="store only the selected features' SAE slices")
    p.add_argument("--device", default=d.device)
    if not sweep:
        p.add_argument("--measure-speedup", action="store_true", help="time the truncated forward against a full one")


def options_from_args(args) -> BuildOptions:
    d = BuildOptions()
    return BuildOptions(
        name=args.name,
        mode=getattr(args, "mode", d.mode),
        layer=args.layer,
        n_features=getattr(args, "n_features", d.n_features),
        clamp=getattr(args, "clamp", d.clamp),
        ratio_percentile=getattr(args, "ratio_percentile", d.ratio_percentile),
        importance_percentile=args.importance_percentile,
        static_retain_freq=args.static_retain_freq,
        threshold_percentile=args.threshold_percentile,
        target_fpr=args.target_fpr,
        score=args.score,
        window=args.window,
        action=getattr(args, "action", d.action),
        refusal=getattr(args, "refusal", d.refusal),
        seq_len=args.seq_len,
        min_chars=args.min_chars,
        max_docs=args.max_docs,
        packing=args.packing,
        heldout_fraction=args.heldout_fraction,
        batch_size=args.batch_size,
        seed=args.seed,
        slim=getattr(args, "slim", False),
        device=args.device,
        measure_speedup=getattr(args, "measure_speedup", False),
    )


def run(args):
    info = build(
        args.base,
        args.sae,
        args.forget,
        args.retain,
        args.out,
        options=options_from_args(args),
        add_to=args.add_to,
        overwrite=args.overwrite,
        text_field=args.text_field,
    )
    held = info["heldout"]
    print(
        f"guardrail {info['name']!r}: layer {info['layer']}, {info['n_features']} features, tau = {info['tau']:.4f}, "
        f"action {info['action']}" + (f" (refusal {info['refusal']!r})" if info.get("refusal") is not None else "")
    )
    if held["forget_trigger_rate"] is None:
        print("held-out trigger rate: none measured (--heldout-fraction 0)")
    else:
        print(
            f"held-out trigger rate: forget {held['forget_trigger_rate']:.3f} ({held['n_forget']} rows), "
            f"retain {held['retain_trigger_rate']:.3f} ({held['n_retain']} rows), AUROC {held['auroc']:.3f}"
        )
    if info["n_features"] < args.n_features:
        import sys

        filters = (
            "the ratio and importance percentile filters"
            if info["mode"] == "dynamic"
            else "the retain-frequency filter"
        )
        print(
            f"dsg: warning: only {info['n_features']} of the {args.n_features} features asked for (--n-features) pass "
            f"{filters}; the guardrail uses {info['n_features']}",
            file=sys.stderr,
        )
    t = info["timings"]
    print(
        f"statistics pass {t['statistics_s']:.1f} s ({t['statistics_tokens_per_s']:.0f} tokens/s), "
        f"selection {t['selection_s'] * 1000:.1f} ms, calibration {t['calibration_s'] * 1000:.1f} ms"
    )
    print(f"wrote {Path(args.out).resolve()}")
