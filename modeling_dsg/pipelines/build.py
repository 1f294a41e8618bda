"""`dsg build`: from a base model, an SAE and forget/retain corpora to an unlearned DSG model folder.

The path (defaults are the paper's unless said otherwise):

1. Corpora to token rows (`rows.build_rows`): documents longer than 50 characters, up to 2048 per corpus, one
   document per row, its first 256 tokens exactly as the guard sees it as a prompt, padded (the embedded
   default's rows: the guard judges prompts, and rows shaped like them calibrate it; `dsg build`'s paper rows,
   `--packing --seq-len 1024 --max-docs 1024`, join documents with EOS into rows of `seq_len` tokens with BOS at
   position 0, and on the embedded corpora lose recall with every gate: experiments/guard-v2/feature-gate,
   "Packed rows"). Forget and retain get equal row counts (seeded), and a seeded `heldout_fraction` (default
   0.2) of each is set aside, never used for selection or calibration (0: no held-out rows; the held-out trigger
   rates are then recorded as null).
2. The statistics pass (`stats.collect`): a forward that stops after block `layer`, the SAE's
   activations per token, per-feature mean activation and firing frequency on forget and on retain.
   Tokens counted are those the guard counts at run time: not padding, not BOS.
3. Selection. In dynamic mode the default score, "features", takes its features and their integer weights from
   one fit over the build rows (`selection.fit_feature_gate`). `--score window` or `fraction` (and static mode)
   select with `selection.select_dynamic` / `select_static`, see that module for every formula, and step 4's
   token gate applies to them.
4. The gate and calibration (the defaults go beyond the paper; `dsg results`, "gates", measures why):
   score "features" over 32-token windows (`--score window`: the learned token gate, `selection.fit_token_gate`,
   over 32-token windows), and tau = the smallest threshold whose one-sided 95% Clopper-Pearson bound on the
   retain firing rate is <= 0.025 (`--target-fpr`). A bound needs enough retain rows (119 for 0.025): with
   fewer, or when no tau below 1 meets it, the default falls back to the paper's 95th percentile, says so and
   records it (`calibration.fallback`); an explicit `--target-fpr` refuses instead. The paper's gate is
   `--score fraction --token-gate any --threshold-percentile 95`. The trigger rates on the held-out forget and
   retain rows are measured with that tau (static mode is always on: tau = 0, and a row "fires" when any
   selected feature is active in it, rho > 0).
5. The model folder: the base weights, the SAE, the guardrail config, the tokenizer, `features.json`
   (each selected feature's statistics and top-activating tokens in context) and `dsg_build.json`
   (sources, options, rho summaries, held-out trigger rates, timings). Written atomically.

`--add-to DIR` stacks a new guardrail on an existing DSG model: the statistics pass then runs through
that model with its guardrails active (as deployed), and the existing guardrails are not touched.

Over several processes (`torchrun --nproc_per_node N -m modeling_dsg build ...`, or `accelerate launch`; see
`modeling_dsg.distributed`) every process loads the inputs and runs its share of the statistics pass
(`stats.collect` shards the batches and gathers the stores in batch order), so each holds the build one
process would make; process 0 alone writes the folder and prints. `dsg_build.json` records the process
count in `timings.statistics_processes`.

`--action clamp|refuse|monitor` (configuration_dsg.ACTIONS) is what the new guardrail does when it fires
(stacked guardrails may differ): clamp (the paper's edit, the default), refuse (the continuation is
`--refusal TEXT`, default configuration_dsg.DEFAULT_REFUSAL, then end of sequence; the text is tokenized
with the model's tokenizer, add_special_tokens=False, into the config's `refusal_ids`) or monitor (decide,
edit nothing). Selection and calibration do not depend on the action; dsg_build.json records it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from .. import distributed
from ..analysis.selection import FeatureStats
from ..analysis.stats import ActivationStore
from ..data.records import (
    BUILD_FILE,
    FEATURES_FILE,
    BuildRecord,
    ConfigFile,
    FeatureEntry,
    FeaturesFile,
    GuardrailFeatures,
    GuardrailRecord,
    TopToken,
    check_typed,
    read_record,
    write_record,
)
from ..data.rows import ROW_HELP, Rows, row_option_checks
from ..errors import DSGError, raise_first
from ..options import add_corpora, add_options, from_args, option
from ..runtime.configuration_dsg import (
    ACTIONS,
    DEFAULT_REFUSAL,
    MAX_CLAMP,
    MAX_WINDOW,
    MODES,
    SCORES,
    TOKEN_VALUES,
    WINDOWED,
)

# c, in the SAE's activation units: the sweep's rule with a fluency floor on the embedded default (`dsg results`,
# "The clamp axis"): the lowest forget score whose fired answers stay within 1 nat per token of the base's own
# (5 on the shipped JumpReLU SAE; 3 on the TopK SAE it replaced). The paper's 500 forgets somewhat more on held-out
# questions but turns fired answers into gibberish.
DEFAULT_CLAMP = 5.0
TOKEN_GATES = ("any", "learned")
# the default calibration: a 95% bound on the retain firing rate. 0.025, not 0.02: with the default gate on the
# embedded corpora 0.02 leaves WMDP-bio through the chat template at 0.949, 0.025 meets every goal in every format
# with non-biology MMLU at 0.011-0.013 (experiments/guard-v2/feature-gate)
DEFAULT_TARGET_FPR = 0.025
# the score when --score is not given: "features" in dynamic mode, and "window" in static mode (which has no
# classifier to weigh features) or with --token-gate / --token-value (which weigh the window and fraction scores)
DEFAULT_SCORE = "features"
PAPER_PERCENTILE = 95.0  # the paper's calibration, and the default's fallback when the bound cannot be met


@dataclass
class BuildOptions:
    """Every knob of a build, with the paper's defaults except the clamp (`DEFAULT_CLAMP`); each field is also a
    `dsg build` option."""

    name: str = option("forget", help="the topic (guardrail name)")
    mode: str = option("dynamic", choices=MODES, help="DSG (dynamic) or the seed paper's always-on clamp (static)")
    layer: int | None = option(None, help="default: the SAE's hook layer")
    n_features: int = option(20, help="N, the number of features selected")
    clamp: float = option(
        DEFAULT_CLAMP,
        help=f"c: selected features are set to -c when the guardrail fires (default {DEFAULT_CLAMP:g}, measured "
        "on the embedded default to keep fired answers fluent; the paper's is 500)",
    )
    ratio_percentile: float = option(
        95.0, help="dynamic: keep features whose forget/retain ratio is at least this percentile"
    )
    importance_percentile: float = option(5.0, help="dynamic: and whose forget importance is at least this percentile")
    static_retain_freq: float = option(
        0.01, help="static: drop features firing on at least this fraction of retain tokens"
    )
    threshold_percentile: float | None = option(
        None, help=f"tau = this percentile of rho over retain rows (the paper's rule, with {PAPER_PERCENTILE:g})"
    )
    target_fpr: float | None = option(
        None,
        help=f"tau = the smallest threshold whose retain firing rate has a one-sided 95%% Clopper-Pearson upper "
        f"bound <= this. Default (neither this nor --threshold-percentile): {DEFAULT_TARGET_FPR:g}, falling back "
        f"to the {PAPER_PERCENTILE:g}th percentile, with a warning, when the retain rows are too few for the bound",
    )
    score: str | None = option(
        None,
        choices=SCORES,
        help="rho: features (the default in dynamic mode): the largest share, over any --window tokens, of the "
        "integer weights of the features active somewhere in them (features and weights fit on the build rows: "
        "`selection.fit_feature_gate`); window (the default in static mode and with --token-gate/--token-value): "
        "the largest flagged share of any --window tokens; or fraction: the flagged fraction of the whole "
        "sequence (the paper's). Filler cannot dilute features or window",
    )
    window: int = option(32, help="window size for --score window and --score features")
    token_gate: str | None = option(
        None,
        choices=TOKEN_GATES,
        help="for --score window and fraction (given alone, it picks --score window): which tokens the score counts "
        "as flagged: learned (integer per-feature weights fit on the forget and retain tokens, see `dsg explain`; "
        "the default in dynamic mode) or any (a selected feature is active: the paper's, and static mode's)",
    )
    token_value: str | None = option(
        None,
        choices=TOKEN_VALUES,
        help="what a token adds to the score: points (its learned points floored at 0, so rho is a share of the "
        "most points: the default with the learned token gate) or flag (1 if flagged, so rho is a share of "
        "flagged tokens: the only one with --token-gate any)",
    )
    action: str = option(
        "clamp",
        choices=ACTIONS,
        help="what the guardrail does when it fires: clamp (the paper's edit), refuse (answer with "
        "--refusal, then end of sequence) or monitor (decide and report, edit nothing)",
    )
    refusal: str | None = option(
        None, metavar="TEXT", help=f"with --action refuse: the refusal text (default {DEFAULT_REFUSAL!r})"
    )
    # prompt-shaped rows (the embedded default's); the paper's: --packing --seq-len 1024 --max-docs 1024
    seq_len: int = option(256, help=ROW_HELP["seq_len"])
    min_chars: int = option(50, help=ROW_HELP["min_chars"])
    max_docs: int | None = option(2048, help=ROW_HELP["max_docs"])
    packing: bool = option(
        False,
        negatable=True,
        help="--packing: join the documents with EOS and cut the stream into --seq-len rows (the paper's); "
        "--no-packing (the default): one document per row, as the guard sees it as a prompt",
    )
    heldout_fraction: float = option(0.2, help="rows of each corpus set aside for the held-out trigger rates")
    batch_size: int = option(8, help="rows per forward in the statistics pass")
    seed: int = option(0, help=ROW_HELP["seed"])
    top_tokens: int = option(8, cli=False)  # top-activating tokens kept per feature in features.json
    slim: bool = option(False, help="store only the selected features' SAE slices")
    device: str = option("cpu")
    measure_speedup: bool = option(False, help="time the truncated forward against a full one")

    def scored(self) -> str:
        """The score: --score, else `DEFAULT_SCORE` ("features") in dynamic mode without --token-gate and
        --token-value, and "window" otherwise."""
        if self.score is not None:
            return self.score
        plain = self.mode == "dynamic" and self.token_gate is None and self.token_value is None
        return DEFAULT_SCORE if plain else "window"

    def gate(self) -> tuple[str, bool]:
        """The token gate and whether it may fall back to "any": only the default (no --token-gate), which is
        learned in dynamic mode (falling back when the fit would flag no token) and any in static mode (which has
        no classifier whose flags a gate could weigh)."""
        if self.token_gate is not None:
            return self.token_gate, False
        return ("learned", True) if self.mode == "dynamic" else ("any", False)

    def value(self, gate: str) -> str:
        """What a token adds to the score under the token gate `gate`: --token-value, else points with the learned
        gate and flag with any (which has no points)."""
        if self.token_value is not None:
            return self.token_value
        return "points" if gate == "learned" else "flag"

    def calibration(self) -> tuple[str, float, bool]:
        """How tau is chosen: (rule "target_fpr" or "percentile", its value, whether a bound that cannot be met
        falls back to the paper's percentile: only for the default, never for an explicit --target-fpr)."""
        if self.threshold_percentile is not None:
            return "percentile", float(self.threshold_percentile), False
        if self.target_fpr is not None:
            return "target_fpr", float(self.target_fpr), False
        return "target_fpr", DEFAULT_TARGET_FPR, True

    def validate(self) -> None:
        """Refuse bad values before anything is loaded (not after a long statistics pass): one `DSGError`."""
        checks = [
            (
                isinstance(self.name, str) and self.name.strip() != "",
                f"--name must be a non-empty topic name, got {self.name!r}",
            ),
            (self.mode in MODES, f"unknown mode {self.mode!r} (dynamic or static)"),
            (self.n_features >= 1, f"--n-features must be at least 1, got {self.n_features}"),
            (
                self.clamp > 0 and self.clamp != float("inf"),
                f"--clamp must be a finite number > 0, got {self.clamp}",
            ),
            (
                self.clamp <= MAX_CLAMP,
                f"--clamp must be at most {MAX_CLAMP:g} (the model config's bound; the paper uses "
                f"500), got {self.clamp:g}",
            ),
            (
                0 < self.static_retain_freq <= 1,
                f"--static-retain-freq must be in (0, 1], got {self.static_retain_freq}",
            ),
            (0 <= self.heldout_fraction < 1, f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}"),
            *row_option_checks(self, flags=True),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.layer is None or self.layer >= 0, f"--layer must be >= 0, got {self.layer}"),
            (self.score in (None, *SCORES), f"unknown --score {self.score!r} (one of {', '.join(SCORES)})"),
            (
                self.score != "features" or self.mode == "dynamic",
                "--score features is the dynamic classifier's score; a static guardrail has none",
            ),
            (
                self.score != "features" or (self.token_gate is None and self.token_value is None),
                "--score features fits its own feature weights on the build rows; --token-gate and --token-value "
                "are for --score window and fraction",
            ),
            (
                self.token_gate in (None, *TOKEN_GATES),
                f"unknown --token-gate {self.token_gate!r} (any or learned)",
            ),
            (
                self.token_gate != "learned" or self.mode == "dynamic",
                "--token-gate learned weighs the dynamic classifier's flags; a static guardrail has none",
            ),
            (
                self.token_value in (None, *TOKEN_VALUES),
                f"unknown --token-value {self.token_value!r} (one of {', '.join(TOKEN_VALUES)})",
            ),
            (
                self.token_value != "points" or self.gate()[0] == "learned",
                "--token-value points scores the learned token gate's points; it needs --token-gate learned "
                "(the default in dynamic mode)",
            ),
            (2 <= self.window <= MAX_WINDOW, f"--window must be between 2 and {MAX_WINDOW}, got {self.window}"),
            (self.action in ACTIONS, f"unknown --action {self.action!r} (one of {', '.join(ACTIONS)})"),
            (
                self.refusal is None or self.action == "refuse",
                f"--refusal is only valid with --action refuse (the action is {self.action!r})",
            ),
            (
                self.refusal is None or (isinstance(self.refusal, str) and self.refusal.strip() != ""),
                f"--refusal must be a non-empty text, got {self.refusal!r}",
            ),
        ]
        if self.target_fpr is not None:
            checks.append((0 < self.target_fpr < 1, f"--target-fpr must be between 0 and 1, got {self.target_fpr}"))
        checks.append(
            (
                self.target_fpr is None or self.threshold_percentile is None,
                "give --target-fpr or --threshold-percentile, not both: they are two rules for tau",
            )
        )
        for flag in ("ratio_percentile", "importance_percentile", "threshold_percentile"):
            value = getattr(self, flag)
            if value is not None:
                checks.append(
                    (0 <= value <= 100, f"--{flag.replace('_', '-')} must be between 0 and 100, got {value}")
                )
        raise_first(checks)


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
def _corpus_step(corpus: str, step, *args, **kwargs):
    """Run a row-building step; a DSGError from it names the corpus (forget or retain) it is about."""
    try:
        return step(*args, **kwargs)
    except DSGError as err:
        raise DSGError(f"{corpus} corpus: {err}") from None


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


def _feature_report(index, stats, store, rows, tokenizer, k, context=12) -> FeatureEntry:
    """features.json entry for one feature: statistics and top-activating tokens with their context."""
    top = []
    for row, pos, value in store.top_activations(index, k):
        ids = rows.input_ids[row]
        left = _token_text(tokenizer, ids[max(0, pos - context) : pos].tolist())
        token = _token_text(tokenizer, [int(ids[pos])])
        right = _token_text(tokenizer, ids[pos + 1 : pos + 4].tolist())
        top.append(
            TopToken(
                token=token,
                activation=round(float(value), 4),
                context=f"{left}[[{token}]]{right}".replace("\n", " "),
            )
        )
    return FeatureEntry(
        index=int(index),
        forget_mean=float(stats.forget_mean[index]),
        retain_mean=float(stats.retain_mean[index]),
        forget_freq=float(stats.forget_freq[index]),
        retain_freq=float(stats.retain_freq[index]),
        importance=float(stats.importance_forget[index]),
        ratio=float(stats.ratio[index]),
        top_tokens=top,
    )


@dataclass
class Statistics:
    """What one statistics pass produced: everything selection and calibration need, for any options
    that share its rows (so `dsg sweep` runs the pass once for a whole grid)."""

    layer: int
    sae_spec: dict
    sae_state: dict
    forget_rows: Rows  # the forget build split (for features.json)
    stores: dict[str, ActivationStore]  # "forget", "retain" (+ "heldout forget", "heldout retain")
    stats: FeatureStats  # forget vs retain
    timings: dict = field(default_factory=dict)
    options: BuildOptions | None = None  # the options of the pass
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

    options.validate()
    hidden = model.config.get_text_config().hidden_size
    spec, state = guardrail_sae(sae, sae_source)
    if spec["d_in"] != hidden:
        raise DSGError(f"the SAE's d_in ({spec['d_in']}) does not match the model's hidden size ({hidden})")
    layer = _check_layer(model, options.layer, sae_layer)
    context = context_length(model.config)
    if context is not None and options.seq_len > context:
        raise DSGError(
            f"--seq-len {options.seq_len} is longer than the model's context ({context} tokens, "
            "max_position_embeddings); rows that long would run past the positions it was trained on"
        )
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
    encode = sae_encoder(spec, state, options.device)
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
    timings["statistics_processes"] = distributed.world_size()  # the pass's shards (the result is the same)
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


def sae_encoder(spec: dict, state: dict, device):
    """The full SAE's encode, in the runtime's plain-torch form (the same math as the guard at run time)."""
    from ..runtime.sae_dsg import make_sae

    sae = make_sae({**spec, "slim": False}, n_features=1)  # not slim: n_features sizes nothing
    sae.load_state_dict(state)
    return sae.to(device).encode


def counted_exclusions(model, tokenizer) -> list[int]:
    """Token ids the guard does not count (BOS), so statistics count exactly what the guard counts."""
    bos = getattr(model.config.get_text_config(), "bos_token_id", None)
    if bos is None:
        bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return list(bos) if isinstance(bos, (list, tuple)) else [int(bos)]


class Selection(NamedTuple):
    """What `select_and_calibrate` chose: the features, tau, rho per store, the timings, the token gate ({} or
    token_weights and token_threshold, as in the guardrail config) and how it was chosen (`gate`: {"gate": "any",
    "learned" or "features", "fallback": why the default's gate was not used, or None}), the rule that chose tau
    (`calibrate`'s) and the score (the default's "features" falls back to "window" when its fit finds nothing)."""

    features: list[int]
    tau: float
    rho: dict
    timings: dict
    token_gate: dict
    gate: dict
    rule: dict
    score: str


def fit_gate(statistics: Statistics, features: list[int], options: BuildOptions) -> tuple[dict, dict]:
    """`Selection.token_gate` and `Selection.gate` for `options`."""
    from ..analysis import selection

    name, may_fall_back = options.gate()
    if name == "any":
        return {}, {"gate": "any", "fallback": None}
    stores = statistics.stores
    try:
        weights, threshold = selection.fit_token_gate(stores["forget"], stores["retain"], features)
    except DSGError as err:
        if not may_fall_back or options.token_value == "points":
            raise
        return {}, {"gate": "any", "fallback": str(err)}
    token_gate = {"token_weights": weights, "token_threshold": threshold}
    if options.value("learned") == "points":
        token_gate["token_value"] = "points"
    return token_gate, {"gate": "learned", "fallback": None}


def calibrate(retain_rho, options: BuildOptions) -> tuple[float, dict]:
    """tau for a dynamic guardrail and the rule that chose it: {"rule": "target_fpr", "target_fpr"} or
    {"rule": "percentile", "threshold_percentile"}, the latter with "fallback" ({"target_fpr", "reason"}) when the
    default bound could not be met and the paper's percentile was used instead."""
    from ..analysis import selection

    rule, value, may_fall_back = options.calibration()
    if rule == "percentile":
        return selection.calibrate_threshold(retain_rho, value), {"rule": rule, "threshold_percentile": value}
    try:
        return selection.calibrate_fpr(retain_rho, value)[0], {"rule": rule, "target_fpr": value}
    except DSGError as err:
        if not may_fall_back:
            raise
        tau = selection.calibrate_threshold(retain_rho, PAPER_PERCENTILE)
        fallback = {"target_fpr": value, "reason": str(err)}
        return tau, {"rule": "percentile", "threshold_percentile": PAPER_PERCENTILE, "fallback": fallback}


def select_and_calibrate(statistics: Statistics, options: BuildOptions) -> Selection:
    """Features, token gate and tau for `options` from a statistics pass."""
    from ..analysis import selection

    options.validate()
    check_sae_options(options, statistics.sae_spec["d_sae"])
    stats, stores = statistics.stats, statistics.stores
    start = time.perf_counter()
    features_failed = None
    if options.scored() == "features":
        try:
            features, weights = selection.fit_feature_gate(stores["forget"], stores["retain"], options.n_features)
        except DSGError as err:
            if options.score is not None:  # asked for: refuse
                raise
            features_failed = f"score features: {err}"  # the default: the window score instead, said and recorded
            options = replace(options, score="window")
    if options.scored() == "features":
        token_gate, gate_record = (
            {"token_weights": weights, "token_threshold": 1},
            {"gate": "features", "fallback": None},
        )
    else:
        if options.mode == "dynamic":
            features = selection.select_dynamic(
                stats, options.n_features, options.ratio_percentile, options.importance_percentile
            )
        else:
            features = selection.select_static(stats, options.n_features, options.static_retain_freq)
        token_gate, gate_record = fit_gate(statistics, features, options)
        if features_failed:
            gate_record["fallback"] = "; ".join(filter(None, [features_failed, gate_record["fallback"]]))
    timings = {"selection_s": time.perf_counter() - start}
    start = time.perf_counter()
    gate = {"features": features, "score": options.scored(), "window": options.window, **token_gate}
    rho = {name: store.guardrail_scores(gate) for name, store in stores.items()}
    if options.mode == "dynamic":
        tau, rule = calibrate(rho["retain"], options)
    else:
        tau, rule = 0.0, {"rule": "static"}  # always on: fires wherever a selected feature is active
    timings["calibration_s"] = time.perf_counter() - start
    return Selection(features, float(tau), rho, timings, token_gate, gate_record, rule, options.scored())


def calibration_record(retain_rho, tau: float, rule: dict) -> dict:
    """How tau was chosen (`Selection.rule`), and the retain firing rate at tau with its one-sided 95%
    Clopper-Pearson upper bound (the false-positive guarantee, reported whichever rule chose tau)."""
    from ..analysis import selection

    n = int(retain_rho.numel())
    fired = int((retain_rho > tau).sum())
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
    token_gate: dict | None = None,
) -> dict:
    """The guardrail config; `refusal` (text, token ids: `refusal_for`) is needed for action "refuse";
    `token_gate` is `Selection.token_gate`."""
    guardrail = {
        "name": options.name,
        "layer": statistics.layer,
        "mode": options.mode,
        "features": list(features),
        "clamp": float(options.clamp),
        "threshold": float(tau),
        "score": options.scored(),
        "action": options.action,
        "sae": {**statistics.sae_spec, "slim": False},
    }
    if options.scored() in WINDOWED:
        guardrail["window"] = options.window
    guardrail.update(token_gate or {})
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
    chosen = select_and_calibrate(statistics, options)
    features, tau, rho = chosen.features, chosen.tau, chosen.rho
    timings = {**statistics.timings, **chosen.timings}
    stores = statistics.stores
    report = [
        _feature_report(i, statistics.stats, stores["forget"], statistics.forget_rows, tokenizer, options.top_tokens)
        for i in features
    ]
    info = GuardrailRecord(
        name=options.name,
        mode=options.mode,
        action=options.action,
        **({"refusal": refusal[0], "refusal_ids": refusal[1]} if refusal else {}),
        sae=sae_source,
        layer=statistics.layer,
        n_features=len(features),
        clamp=float(options.clamp),
        ratio_percentile=options.ratio_percentile,
        importance_percentile=options.importance_percentile,
        threshold_percentile=chosen.rule.get("threshold_percentile"),
        tau=float(tau),
        calibration=calibration_record(rho["retain"], tau, chosen.rule),
        token_gate=chosen.gate,
        rows={
            "forget": stores["forget"].n_rows,
            "retain": stores["retain"].n_rows,
            "seq_len": statistics.forget_rows.seq_len,
            "packing": options.packing,
        },
        tokens={name: store.n_tokens for name, store in stores.items()},
        rho={name.replace(" ", "_"): selection.rho_summary(r) for name, r in rho.items()},
        heldout=heldout_summary(rho, tau, statistics),
        timings=timings,
        options=asdict(options),
    )
    return GuardrailBuild(
        guardrail_from(statistics, features, tau, replace(options, score=chosen.score), refusal, chosen.token_gate),
        statistics.sae_state,
        report,
        info,
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
    features: FeaturesFile = previous.get("features") or {}
    features["guardrails"] = list(features.get("guardrails") or []) + [
        GuardrailFeatures(
            name=b.guardrail["name"], layer=b.guardrail["layer"], mode=b.guardrail["mode"], features=b.features
        )
        for b in builds
    ]
    write_record(out, FEATURES_FILE, features)
    record: BuildRecord = previous.get("build") or {"base_model": base_spec}
    record["guardrails"] = list(record.get("guardrails") or []) + [
        GuardrailRecord(  # type: ignore[typeddict-item]
            {
                **b.info,
                "forget_sources": b.info.get("forget_sources", []),
                "retain_sources": b.info.get("retain_sources", []),
            }
        )
        for b in builds
    ]
    write_record(out, BUILD_FILE, record)


def _read_previous(folder: Path) -> dict:
    previous = {}
    for key, name in (("features", FEATURES_FILE), ("build", BUILD_FILE)):
        data = read_record(Path(folder) / name)
        if data is not None:
            previous[key] = data
    return previous


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
    from ..data.sources import load_base_model, load_sae, load_sources, sae_layer
    from ..outputs import prepare_output
    from ..paths import atomic_output_dir

    options = options or BuildOptions()
    options.validate()
    distributed.init(options.device)  # launched over several processes: every one runs the pass, process 0 writes
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
    forget_texts, forget_specs = load_sources(forget, text_field)
    retain_texts, retain_specs = load_sources(retain, text_field)
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

    def write():
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            write_folder(model, tokenizer, tmp, [result], base_spec, previous, slim=options.slim)

    distributed.on_main(write, f"writing {out}")
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
    check_typed(config, ConfigFile, f"--add-to {folder}: config.json")
    if config.get("model_type") != "dsg":
        raise DSGError(f"--add-to {folder}: not a DSG model (model_type {config.get('model_type')!r})")
    names = {g.get("name") for g in config.get("guardrails") or []}
    if options.name in names:
        raise DSGError(f"--add-to {folder}: it already has a guardrail named {options.name!r}; pick another --name")
    previous = _read_previous(folder)  # a broken features.json or dsg_build.json fails before the model loads
    model, tokenizer, _ = load_dsg_model(folder, device=options.device, what=f"--add-to {folder}")
    return model, tokenizer, previous


def fallback_notes(info: dict) -> list[str]:
    """What a default could not do in this build (a `GuardrailRecord`), one sentence each: the feature gate whose
    fit finds nothing, the learned token gate that would flag no token, or a false-positive bound that the retain
    rows cannot show."""
    notes = []
    gate = info.get("token_gate") or {}
    if gate.get("fallback") and gate.get("gate") == "any":
        notes.append(f"the token gate is the paper's (any selected feature), not the learned one: {gate['fallback']}")
    elif gate.get("fallback"):
        notes.append(f"the score is window (the learned token gate), not the default features: {gate['fallback']}")
    fallback = (info.get("calibration") or {}).get("fallback")
    if fallback:
        notes.append(
            f"tau is the {info['threshold_percentile']:g}th percentile of retain rho (the paper's rule), not the "
            f"default false-positive bound {fallback['target_fpr']:g}: {fallback['reason']}"
        )
    return notes


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
    add_corpora(p)
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the sweep's report folder to write" if sweep else "the model folder to write",
    )
    if not sweep:
        p.add_argument("--add-to", metavar="DIR", help="stack a new guardrail on this existing DSG model folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_options(p, BuildOptions, exclude=SWEEP_AXES if sweep else ())


# Options the sweep's grid replaces (or that only make sense for one folder): not offered by `dsg sweep`.
SWEEP_AXES = ("mode", "n_features", "clamp", "ratio_percentile", "action", "refusal", "slim", "measure_speedup")


def options_from_args(args) -> BuildOptions:
    return from_args(BuildOptions, args)


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
    if not distributed.is_main():  # one process reports (they all hold the same result)
        return
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
    for note in fallback_notes(info):
        print(f"dsg: warning: {note}", file=sys.stderr)
    if info["n_features"] < args.n_features:
        filters = {
            "features": "the feature gate's fit (active in more forget rows than retain rows, a positive weight)",
            "dynamic": "the ratio and importance percentile filters",
            "static": "the retain-frequency filter",
        }["features" if (info.get("token_gate") or {}).get("gate") == "features" else info["mode"]]
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
