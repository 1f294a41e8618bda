"""Configuration of a DSG (Dynamic SAE Guardrails) model.

A `DSGConfig` wraps the configuration of any Hugging Face causal LM (`text_config`) and a list of
*guardrails*. Everything is a plain JSON value, so `config.json` can be read and edited by hand, and
every field is validated when the config is built (also when it is loaded from disk).

A guardrail (one forget topic) is a dict with these fields:

    name       str    the topic, e.g. "biology"; unique within the model.
    layer      int    decoder block whose *output* (the residual stream after block `layer`, sae-lens
                      hook "model.layers.{layer}") the SAE reads and edits. 0 <= layer < num layers.
    mode       str    "dynamic" (DSG): a per-sequence classifier decides; when the sequence fires, every
                      token where a selected feature is active gets all selected features set to -clamp.
                      "static" (Farrell et al. baseline): always on; each active selected feature is set
                      to -clamp where it is active; `threshold` is ignored.
    features   [int]  the selected SAE feature indices (distinct, 0 <= i < d_sae, at least one).
    clamp      float  0 < c <= 1e6: selected features are set to -c.
    threshold  float  tau in [0, 1]: a sequence fires when its score rho > tau.
    token_weights [int] optional, dynamic only: one integer weight per feature (same order). A counted
                      token is then *flagged* when the weights of its active features (> 0) add up to at
                      least `token_threshold`; absent, a token is flagged when any feature is active (the
                      paper's). Integers, so a flag is exact however the tokens are batched or chunked.
                      `dsg build --token-gate learned` fits them (a logistic regression over the tokens).
    token_threshold int  with token_weights: the points a token needs to be flagged (>= 1; default 1).
    token_value str   with token_weights: what a counted token adds to the score (default "flag"):
                      "flag": 1 if flagged, else 0;
                      "points": its points floored at 0 (the weights of its active features, summed), over
                      the most a token can have (the positive weights' sum). rho is then the share of the
                      possible points, a finer score than the share of flagged tokens.
    score      str    how rho is computed over the real tokens (not padding, not BOS) seen so far:
                      "fraction": the fraction of tokens where any selected feature is > 0 (the paper's);
                      "window": the largest such fraction over any `window` consecutive real tokens
                      (the fraction itself while fewer than `window` tokens were seen). Padding a
                      prompt with harmless filler dilutes "fraction" but not "window";
                      "features": the largest share, over any `window` consecutive real tokens (fewer at the
                      start of a row), of the points of the features active somewhere in those tokens: each
                      feature counts once per window with its integer `token_weights` entry, and rho is that
                      sum floored at 0 over the positive weights' sum (needs `token_weights`; exact integer
                      sums, so the same in any batch or chunk). `dsg build --score features` fits the weights
                      on the build rows (a logistic regression over which features a row, or a 256-token
                      piece of a longer row, activates).
    action     str    what a fired guardrail does (default "clamp"):
                      "clamp": the edit above (the paper's);
                      "refuse": no edit; a fired row's continuation is `refusal_ids`, then end of
                      sequence (its logits put all weight on the next refusal token, at every position
                      of the call in which it fires and after); needs a KV cache to generate;
                      "monitor": decide and report (the model output's `guardrail_decisions`), edit
                      nothing: every row's outputs are bit-identical to the base model's.
    refusal    str    "refuse" only: the refusal text (for display; default "I can't help with that.").
    refusal_ids [int] "refuse" only: the refusal's token ids in the model's tokenizer (non-empty).
    window     int    window size for scores "window" and "features" (2 ..= 2**20; default 32). Absent for
                      "fraction".
    sae        dict   the sparse autoencoder (names and math as in sae-lens):
        architecture            "standard" | "jumprelu" | "topk" | "gated"
        d_in, d_sae             int (at most 2**25); d_in must equal the base model's hidden size
        apply_b_dec_to_input    bool (default false): subtract b_dec from the input before encoding
        normalize_activations   "none" | "constant_norm_rescale" | "layer_norm" (default "none")
        k                       int, TopK only (1 <= k <= d_sae)
        rescale_acts_by_decoder_norm  bool, TopK only (default false)
        slim                    bool (default false): the checkpoint stores only the selected features'
                                slices of the SAE (for TopK the encoder stays whole: TopK needs every
                                pre-activation to know which features are in the top k)
        source                  str, optional: where the SAE came from (a sae-lens release or folder)
"""

from __future__ import annotations

import copy
import math

from transformers import AutoConfig, PretrainedConfig

SAE_ARCHITECTURES = ("standard", "jumprelu", "topk", "gated")
MODES = ("dynamic", "static")
SCORES = ("fraction", "window", "features")
WINDOWED = ("window", "features")  # the scores that take a window
TOKEN_VALUES = ("flag", "points")
ACTIONS = ("clamp", "refuse", "monitor")
DEFAULT_REFUSAL = "I can't help with that."
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
# Bounds that no real guardrail comes near, so a config cannot ask for a terabyte or overflow to inf:
MAX_D_SAE = 2**25  # 33.5M features (the largest published SAEs have 16M)
MAX_WINDOW = 2**20  # tokens
MAX_TOKEN_WEIGHT = 2**20  # a token's points stay far inside int64 for any number of features
MAX_CLAMP = 1e6  # the paper uses 500; a fp16 hidden state overflows near 6.5e4 x the decoder row norm


def _fail(where: str, message: str):
    raise ValueError(f"DSG config: {where}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_sae(sae: dict, where: str, hidden_size: int | None = None) -> dict:
    """Check an SAE description and return it with defaults filled in."""
    if not isinstance(sae, dict):
        _fail(where, f"'sae' must be a dict, got {type(sae).__name__}")
    sae = dict(sae)
    arch = sae.get("architecture")
    if arch not in SAE_ARCHITECTURES:
        _fail(where, f"unknown SAE architecture {arch!r} (expected one of {', '.join(SAE_ARCHITECTURES)})")
    for key in ("d_in", "d_sae"):
        if not _is_int(sae.get(key)) or not 0 < sae[key] <= MAX_D_SAE:
            _fail(where, f"sae.{key} must be an integer in [1, {MAX_D_SAE}], got {sae.get(key)!r}")
    if hidden_size is not None and sae["d_in"] != hidden_size:
        _fail(where, f"sae.d_in = {sae['d_in']} does not match the base model's hidden size {hidden_size}")
    sae.setdefault("apply_b_dec_to_input", False)
    sae.setdefault("normalize_activations", "none")
    sae.setdefault("slim", False)
    for key in ("apply_b_dec_to_input", "slim"):
        if not isinstance(sae[key], bool):
            _fail(where, f"sae.{key} must be true or false, got {sae[key]!r}")
    if sae["normalize_activations"] not in NORMALIZATIONS:
        _fail(
            where,
            f"sae.normalize_activations {sae['normalize_activations']!r} is not supported "
            f"(expected one of {', '.join(NORMALIZATIONS)})",
        )
    if arch == "topk":
        k = sae.get("k")
        if not _is_int(k):
            _fail(where, "a TopK SAE needs an integer sae.k")
        if not 1 <= k <= sae["d_sae"]:
            _fail(where, f"sae.k = {k} must be in [1, d_sae = {sae['d_sae']}]")
        sae.setdefault("rescale_acts_by_decoder_norm", False)
        if not isinstance(sae["rescale_acts_by_decoder_norm"], bool):
            _fail(where, "sae.rescale_acts_by_decoder_norm must be true or false")
    else:
        for key in ("k", "rescale_acts_by_decoder_norm"):
            if sae.get(key) not in (None, False):
                _fail(where, f"sae.{key} is only meaningful for a TopK SAE")
    if "source" in sae and sae["source"] is not None and not isinstance(sae["source"], str):
        _fail(where, "sae.source must be a string")
    return sae


def validate_guardrail(g: dict, index: int, num_layers: int | None = None, hidden_size: int | None = None) -> dict:
    """Check one guardrail dict (see the module docstring) and return it with defaults filled in."""
    where = f"guardrail {index}"
    if not isinstance(g, dict):
        _fail(where, f"must be a dict, got {type(g).__name__}")
    g = dict(g)
    name = g.get("name")
    if not isinstance(name, str) or not name.strip():
        _fail(where, "needs a non-empty 'name' (the topic)")
    where = f"guardrail {index} ({name!r})"
    unknown = set(g) - {
        "name",
        "layer",
        "mode",
        "features",
        "clamp",
        "threshold",
        "score",
        "window",
        "sae",
        "action",
        "refusal",
        "refusal_ids",
        "token_weights",
        "token_threshold",
        "token_value",
    }
    if unknown:
        _fail(where, f"unknown field(s) {', '.join(sorted(unknown))}")
    layer = g.get("layer")
    if not _is_int(layer) or layer < 0:
        _fail(where, f"'layer' must be a non-negative integer, got {layer!r}")
    if num_layers is not None and layer >= num_layers:
        _fail(where, f"layer {layer} is out of range: the base model has {num_layers} layers (0..{num_layers - 1})")
    g.setdefault("mode", "dynamic")
    if g["mode"] not in MODES:
        _fail(where, f"unknown mode {g['mode']!r} (expected 'dynamic' or 'static')")
    g.setdefault("score", "fraction")
    if g["score"] not in SCORES:
        _fail(where, f"unknown score {g['score']!r} (expected one of {', '.join(SCORES)})")
    if g["score"] in WINDOWED:
        g.setdefault("window", 32)
        if not _is_int(g["window"]) or not 2 <= g["window"] <= MAX_WINDOW:
            _fail(where, f"'window' must be an integer in [2, {MAX_WINDOW}], got {g['window']!r}")
    elif g.get("window") is not None:
        _fail(where, "'window' is only meaningful with scores 'window' and 'features'")
    else:
        g.pop("window", None)
    g.setdefault("action", "clamp")
    if g["action"] not in ACTIONS:
        _fail(where, f"unknown action {g['action']!r} (expected one of {', '.join(ACTIONS)})")
    if g["action"] == "refuse":
        g.setdefault("refusal", DEFAULT_REFUSAL)
        if not isinstance(g["refusal"], str) or not g["refusal"].strip():
            _fail(where, "'refusal' must be a non-empty string")
        ids = g.get("refusal_ids")
        if not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(i) and i >= 0 for i in ids):
            _fail(
                where,
                "action 'refuse' needs 'refusal_ids': the refusal's token ids, a non-empty list of "
                "non-negative integers",
            )
        g["refusal_ids"] = list(ids)
    else:
        for key in ("refusal", "refusal_ids"):
            if g.get(key) is not None:
                _fail(where, f"'{key}' is only meaningful with action 'refuse'")
            g.pop(key, None)
    clamp = g.get("clamp", 500.0)
    if not _is_number(clamp) or not 0 < clamp <= MAX_CLAMP:
        _fail(where, f"'clamp' must be a number in (0, {MAX_CLAMP:g}], got {clamp!r}")
    g["clamp"] = float(clamp)
    tau = g.get("threshold", 0.0)
    if not _is_number(tau) or not 0.0 <= tau <= 1.0:
        _fail(where, f"'threshold' must be a number in [0, 1], got {tau!r}")
    g["threshold"] = float(tau)
    g["sae"] = validate_sae(g.get("sae"), where, hidden_size)
    features = g.get("features")
    if not isinstance(features, (list, tuple)) or not features:
        _fail(where, "'features' must be a non-empty list of SAE feature indices")
    if not all(_is_int(i) for i in features):
        _fail(where, "'features' must hold integers")
    d_sae = g["sae"]["d_sae"]
    bad = [i for i in features if not 0 <= i < d_sae]
    if bad:
        _fail(where, f"feature index {bad[0]} is out of range [0, d_sae = {d_sae})")
    if len(set(features)) != len(features):
        repeated = sorted({i for i in features if features.count(i) > 1})
        _fail(where, f"feature index {repeated[0]} is repeated")
    g["features"] = list(features)
    _validate_token_gate(g, where)
    return g


def _validate_token_gate(g: dict, where: str) -> None:
    """Check (in place) the optional per-feature token weights of a guardrail."""
    weights = g.get("token_weights")
    if g["score"] == "features" and weights is None:
        _fail(where, "score 'features' weighs each feature seen in a window: it needs 'token_weights'")
    if weights is None:
        for key in ("token_threshold", "token_value"):
            if g.get(key) is not None:
                _fail(where, f"'{key}' is only meaningful with 'token_weights'")
            g.pop(key, None)
        return
    if g["mode"] != "dynamic":
        _fail(where, "'token_weights' weigh the dynamic classifier's flags; a static guardrail has none")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(g["features"]):
        _fail(where, f"'token_weights' must be a list of {len(g['features'])} integers, one per feature")
    if not all(_is_int(w) and abs(w) <= MAX_TOKEN_WEIGHT for w in weights):
        _fail(where, f"'token_weights' must hold integers in [-{MAX_TOKEN_WEIGHT}, {MAX_TOKEN_WEIGHT}]")
    threshold = g.get("token_threshold", 1)
    if not _is_int(threshold) or not 1 <= threshold <= MAX_TOKEN_WEIGHT:
        _fail(where, f"'token_threshold' must be an integer in [1, {MAX_TOKEN_WEIGHT}], got {threshold!r}")
    g["token_weights"], g["token_threshold"] = list(weights), threshold
    value = g.pop("token_value", "flag")
    if value not in TOKEN_VALUES:
        _fail(where, f"unknown token_value {value!r} (expected one of {', '.join(TOKEN_VALUES)})")
    if value == "points" and g["score"] == "features":
        _fail(where, "token_value 'points' scores tokens; score 'features' scores the features of a window")
    if g["score"] == "features" and not any(w > 0 for w in weights):
        _fail(where, "score 'features' needs a positive token weight (no window could score)")
    if value == "points":  # stored only when not the default, like 'window'
        if not any(w > 0 for w in weights):
            _fail(where, "token_value 'points' needs a positive token weight (no token could score)")
        g["token_value"] = value


class DSGConfig(PretrainedConfig):
    r"""Configuration for [`DSGForCausalLM`]: a base causal LM plus SAE guardrails.

    Args:
        text_config (`dict` or `PretrainedConfig`): the base model's configuration (any causal LM).
        guardrails (`list[dict]`): the guardrails, applied in order; see the module docstring.
    """

    model_type = "dsg"
    _auto_class = "AutoConfig"  # save_pretrained writes auto_map and copies this file
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, guardrails=None, **kwargs):
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", None)
            if model_type is None:
                raise ValueError("DSG config: text_config needs a 'model_type'")
            text_config = AutoConfig.for_model(model_type, **text_config)
        elif isinstance(text_config, PretrainedConfig):
            text_config = copy.deepcopy(text_config)
        elif text_config is not None:
            raise ValueError(f"DSG config: text_config must be a dict or a config, got {type(text_config).__name__}")
        self.text_config = text_config
        if guardrails is None:
            guardrails = []
        if not isinstance(guardrails, (list, tuple)):
            raise ValueError("DSG config: 'guardrails' must be a list")
        num_layers = getattr(text_config, "num_hidden_layers", None) if text_config is not None else None
        hidden = getattr(text_config, "hidden_size", None) if text_config is not None else None
        self.guardrails = [validate_guardrail(g, i, num_layers, hidden) for i, g in enumerate(guardrails)]
        names = [g["name"] for g in self.guardrails]
        if len(set(names)) != len(names):
            raise ValueError(f"DSG config: guardrail names must be unique, got {names}")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size"):
            if key not in kwargs and text_config is not None and hasattr(text_config, key):
                kwargs[key] = getattr(text_config, key)
        super().__init__(**kwargs)

    def get_text_config(self, *args, **kwargs):
        if self.text_config is None:
            return super().get_text_config(*args, **kwargs)
        return self.text_config
