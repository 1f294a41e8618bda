"""data.records: the build's files checked against their TypedDict definitions (check_typed)."""

import json

import pytest

from modeling_dsg.data import records
from modeling_dsg.errors import DSGError


def feature(**change):
    f = {"index": 3, "forget_mean": 1.0, "top_tokens": [{"token": "a", "activation": 2, "context": "[[a]]"}]}
    f.update(change)
    return f


def test_a_well_formed_file_passes_and_keeps_unknown_keys():
    data = {"guardrails": [{"name": "bio", "layer": 2, "features": [feature()], "extra": {"kept": True}}]}
    assert records.check_typed(data, records.FeaturesFile, "f.json") is data
    assert data["guardrails"][0]["extra"] == {"kept": True}


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "f.json must hold a JSON object, got a list"),
        ({"guardrails": 5}, "f.json: 'guardrails' must be a list of objects, got 5"),
        ({"guardrails": [{"layer": 1}]}, "f.json: guardrails[0] needs a string 'name', got null"),
        ({"guardrails": [{"name": "b", "features": [feature(index="3")]}]}, "features[0]: 'index' must be an integer"),
        (
            {"guardrails": [{"name": "b", "features": [feature(index=True)]}]},
            "features[0]: 'index' must be an integer",
        ),
        (
            {"guardrails": [{"name": "b", "features": [feature(top_tokens=[{"token": 7}])]}]},
            "f.json: guardrails[0]: features[0]: top_tokens[0]: 'token' must be a string, got 7",
        ),
        (
            {"guardrails": [{"name": "b", "features": [feature(top_tokens=[5])]}]},
            "'top_tokens' must be a list of objects",
        ),
    ],
)
def test_a_misshapen_features_file_names_the_key(data, message):
    with pytest.raises(DSGError, match=message.replace("[", r"\[").replace("]", r"\]")):
        records.check_typed(data, records.FeaturesFile, "f.json")


@pytest.mark.parametrize(
    "guardrail, message",
    [
        ({"forget_sources": ["a", 1]}, "'forget_sources' must be a list of strings"),
        ({"sae": 5}, "'sae' must be a string or an object, got 5"),
        ({"tau": "high"}, "'tau' must be a number"),
        ({"refusal_ids": [1, 2.5]}, "'refusal_ids' must be a list of integers"),
        ({"heldout": []}, "'heldout' must be an object"),
    ],
)
def test_a_misshapen_build_record_names_the_key(guardrail, message):
    with pytest.raises(DSGError, match=message):
        records.check_typed({"base_model": "m", "guardrails": [guardrail]}, records.BuildRecord, "b.json")


def test_null_optional_keys_pass_and_numbers_accept_integers():
    record = {"base_model": None, "guardrails": [{"name": "b", "tau": 0, "heldout": None, "sae": {"path": "x"}}]}
    assert records.check_typed(record, records.BuildRecord, "b.json") is record


def test_write_record_refuses_a_record_that_does_not_fit(tmp_path):
    with pytest.raises(DSGError, match="'guardrails' must be a list of objects"):
        records.write_record(tmp_path, records.BUILD_FILE, {"guardrails": "bio"})
    assert not (tmp_path / records.BUILD_FILE).exists()
    path = records.write_record(tmp_path, records.BUILD_FILE, {"base_model": "m", "guardrails": []})
    assert json.loads(path.read_text()) == {"base_model": "m", "guardrails": []}
