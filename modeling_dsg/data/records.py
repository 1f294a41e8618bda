"""The files `dsg build` writes next to the weights, defined once: `features.json` and `dsg_build.json`.

Each file is plain JSON whose shape is the `TypedDict` below. The writer (`pipelines.build`) builds
these dicts and `write_record` saves them; every reader (`dsg explain`, the model card, `--add-to`)
goes through `read_record`, which checks a file against the same definitions with `check_typed`, so a
misshapen or hand-edited file is one `DSGError` that names the key. Keys a definition does not list
are kept as they are (a newer writer's additions survive an older reader), and a key that is absent
or null is accepted unless the definition marks it `Required`.
"""

# no `from __future__ import annotations`: TypedDict must see `Required` to know the required keys
import json
import types
import typing
from pathlib import Path
from typing import Any, Required, TypedDict, Union

from ..errors import DSGError

BUILD_FILE = "dsg_build.json"
FEATURES_FILE = "features.json"


# ------------------------------------------------------------------------------------- features.json
class TopToken(TypedDict, total=False):
    """One of a feature's top activations on the forget rows, with its context (`[[token]]` marks it)."""

    token: str
    activation: float
    context: str


class FeatureEntry(TypedDict, total=False):
    """One selected feature: its statistics (see `analysis.selection`) and its top-activating tokens."""

    index: Required[int]
    forget_mean: float
    retain_mean: float
    forget_freq: float
    retain_freq: float
    importance: float
    ratio: float
    top_tokens: list[TopToken]


class GuardrailFeatures(TypedDict, total=False):
    """The features of one guardrail, in the order the guardrail holds them."""

    name: Required[str]
    layer: int
    mode: str
    features: list[FeatureEntry]


class FeaturesFile(TypedDict, total=False):
    """features.json: one entry per guardrail, in the model's order."""

    guardrails: list[GuardrailFeatures]


# ------------------------------------------------------------------------------------ dsg_build.json
class GuardrailRecord(TypedDict, total=False):
    """How one guardrail was built: its sources, options, tau, the calibration and held-out rates, timings."""

    name: str
    mode: str
    action: str
    refusal: str  # action "refuse" only, with refusal_ids
    refusal_ids: list[int]
    sae: str | dict
    layer: int
    n_features: int
    clamp: float
    ratio_percentile: float
    importance_percentile: float
    threshold_percentile: float  # null when a false-positive bound chose tau
    tau: float
    calibration: dict  # `build.calibration_record`
    token_gate: (
        dict  # `build.Selection.gate`: {"gate": "any", "learned" or "features", "fallback": null or why not learned}
    )
    rows: dict  # {forget, retain, seq_len, packing}
    tokens: dict  # counted tokens per row set
    rho: dict  # per row set, the `analysis.selection.rho_summary` of rho
    heldout: dict  # `build.heldout_summary`
    timings: dict  # seconds per step, the pass's token count and `statistics_processes` (processes it ran over)
    options: dict  # `dataclasses.asdict(BuildOptions)`
    forget_sources: list[str]
    retain_sources: list[str]


class BuildRecord(TypedDict, total=False):
    """dsg_build.json: the base model and one record per guardrail, in the model's order."""

    base_model: str
    guardrails: list[GuardrailRecord]


# --------------------------------------------------------------------------------------- config.json
class GuardrailEntry(TypedDict, total=False):
    """What the tools read of a guardrail in config.json (the runtime's `validate_guardrail` checks the rest)."""

    name: str


class ConfigFile(TypedDict, total=False):
    """What the tools read of a DSG config.json before loading it (the file stays plain, hand-editable JSON)."""

    model_type: str
    guardrails: list[GuardrailEntry]


SCHEMAS = {FEATURES_FILE: FeaturesFile, BUILD_FILE: BuildRecord}
WHAT = {FEATURES_FILE: "feature file", BUILD_FILE: "build record"}


# ------------------------------------------------------------------------------------------ checking
def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _shown(value) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else _kind(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _options(annotation) -> tuple:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _is_typed_dict(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, dict) and hasattr(annotation, "__annotations__")


def _describe(annotation) -> str:
    """How a key of this type is named in an error ("a string", "a list of objects", ...)."""
    words = []
    for option in _options(annotation):
        if typing.get_origin(option) is list:
            (item,) = typing.get_args(option)
            words.append(
                "a list of " + ("objects" if _is_typed_dict(item) else _describe(item).split(" ", 1)[1] + "s")
            )
        else:
            words.append({str: "a string", int: "an integer", float: "a number", dict: "an object"}.get(option, "?"))
    return " or ".join(words)


def _matches(value, annotation) -> bool:
    for option in _options(annotation):
        if typing.get_origin(option) is list:
            (item,) = typing.get_args(option)
            item = dict if _is_typed_dict(item) else item
            if isinstance(value, list) and all(_matches(v, item) for v in value):
                return True
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif _is_typed_dict(option) or option is dict:
            if isinstance(value, dict):
                return True
        elif isinstance(value, option):
            return True
    return False


def check_typed(value: Any, schema: type, where: str) -> Any:
    """`value` (parsed JSON) checked against the TypedDict `schema`, nested ones included; returns it.

    A `DSGError` names the first key that does not fit: "WHERE: 'key' must be a string, got 5", or
    "WHERE needs an integer 'key'" for a `Required` key that is absent or null.
    """
    if not isinstance(value, dict):
        raise DSGError(f"{where} must hold a JSON object, got {_kind(value)}")
    hints = typing.get_type_hints(schema)
    for key, annotation in hints.items():
        item = value.get(key)
        if item is None:
            if key in schema.__required_keys__:
                raise DSGError(f"{where} needs {_describe(annotation)} {key!r}, got {_shown(item)}")
            continue
        if not _matches(item, annotation):
            raise DSGError(f"{where}: {key!r} must be {_describe(annotation)}, got {_shown(item)}")
        for option in _options(annotation):
            if typing.get_origin(option) is list and _is_typed_dict(typing.get_args(option)[0]):
                for i, entry in enumerate(item):
                    check_typed(entry, typing.get_args(option)[0], f"{where}: {key}[{i}]")
    return value


# ---------------------------------------------------------------------------------- reading, writing
def read_record(path) -> dict | None:
    """features.json or dsg_build.json of a model folder, checked against its definition (None if absent)."""
    from .sources import read_json_file

    path = Path(path)
    if not path.exists():
        return None
    return check_typed(read_json_file(path, WHAT[path.name]), SCHEMAS[path.name], str(path))


def write_record(folder, name: str, record: dict) -> Path:
    """Write `record` as `folder/name` (features.json or dsg_build.json), checked against its definition first."""
    path = Path(folder) / name
    check_typed(record, SCHEMAS[name], str(path))
    path.write_text(json.dumps(record, indent=2))
    return path
