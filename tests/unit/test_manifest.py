"""The manifest model, its committed JSON Schema, and the file-name rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.manifest import BUNDLE_FILES, MANIFEST_FILE, Manifest, manifest_json_schema, write_json_schema
from service.mi.params import MIParams

REPO = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO / "model_store" / "manifest.schema.json"


def test_committed_schema_equals_the_generated_one(tmp_path: Path) -> None:
    write_json_schema(tmp_path / "schema.json")
    assert SCHEMA_PATH.is_file(), "model_store/manifest.schema.json is missing: run `make schema`"
    assert SCHEMA_PATH.read_text(encoding="utf-8") == (tmp_path / "schema.json").read_text(encoding="utf-8"), (
        "model_store/manifest.schema.json is stale: run `make schema` and commit it"
    )


def test_schema_forbids_unknown_fields_and_requires_the_core_ones() -> None:
    schema = manifest_json_schema()
    assert schema["additionalProperties"] is False
    for field in ("name", "version", "class_names", "input", "mi", "splits", "files", "calibration"):
        assert field in schema["required"]


def _fields(tiny_bundle: Path) -> dict:
    return json.loads((tiny_bundle / MANIFEST_FILE).read_text())


def test_a_written_manifest_round_trips(tiny_bundle: Path) -> None:
    data = _fields(tiny_bundle)
    m = Manifest.model_validate(data)
    assert json.loads(m.model_dump_json()) == data
    assert m.n_classes == 4 and m.mi == MIParams(threshold=0.2)


@pytest.mark.parametrize("bad_name", ["../model.onnx", "sub/file", ".hidden", MANIFEST_FILE])
def test_files_must_be_plain_names_of_the_bundle(tiny_bundle: Path, bad_name: str) -> None:
    data = _fields(tiny_bundle)
    data["files"][bad_name] = "0" * 64
    with pytest.raises(ValidationError, match="is not a plain file name of the bundle"):
        Manifest.model_validate(data)


@pytest.mark.parametrize("required", BUNDLE_FILES)
def test_files_must_list_every_bundle_file(tiny_bundle: Path, required: str) -> None:
    data = _fields(tiny_bundle)
    del data["files"][required]
    with pytest.raises(ValidationError, match=rf"missing \['{required}'\]"):
        Manifest.model_validate(data)


def test_split_sizes_cannot_exceed_the_dataset(tiny_bundle: Path) -> None:
    data = _fields(tiny_bundle)
    data["splits"]["train"] = data["dataset"]["n_images"]
    with pytest.raises(ValidationError, match="exceed the dataset's"):
        Manifest.model_validate(data)


def test_gap_quantiles_need_the_three_keys(tiny_bundle: Path) -> None:
    data = _fields(tiny_bundle)
    del data["calibration"]["gap_quantiles"]["0.95"]
    with pytest.raises(ValidationError, match=r"missing \['0.95'\]"):
        Manifest.model_validate(data)


def test_the_input_spec_has_no_pixel_range(tiny_bundle: Path) -> None:
    """Preprocessing always gives [0, 1]; a range the server would never read is not accepted (schema 2)."""
    data = _fields(tiny_bundle)
    assert "range" not in data["input"] and data["schema_version"] == 2
    data["input"]["range"] = [0.0, 255.0]
    with pytest.raises(ValidationError, match=r"input\.range\s+Extra inputs are not permitted"):
        Manifest.model_validate(data)
    assert "range" not in manifest_json_schema()["$defs"]["InputSpec"]["properties"]
