"""The checked-in contracts under schemas/ match the code, and validation catches breaks."""

import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config.recipe import Recipe
from pipeline.engine.schemas import FILTERED_MANIFEST, render, validate_table
from pipeline.errors import SchemaError

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def test_checked_in_schemas_are_current():
    for name, body in render().items():
        assert json.loads((SCHEMAS / f"{name}.json").read_text()) == body, f"regenerate schemas/{name}.json"
    assert json.loads((SCHEMAS / "recipe.json").read_text()) == Recipe.model_json_schema()


def test_recipe_schema_documents_every_field():
    schema = Recipe.model_json_schema()
    for name, definition in schema["$defs"].items():
        for field, spec in definition["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no docstring"


def test_validate_table_names_missing_and_mistyped_columns():
    good = FILTERED_MANIFEST.empty_table()
    validate_table(good, FILTERED_MANIFEST, "x")
    with pytest.raises(SchemaError, match="x: column 'phash' is missing"):
        validate_table(good.drop_columns(["phash"]), FILTERED_MANIFEST, "x")
    bad = good.set_column(good.schema.get_field_index("phash"), "phash", pa.array([], pa.string()))
    with pytest.raises(SchemaError, match="column 'phash' is string, expected uint64"):
        validate_table(bad, FILTERED_MANIFEST, "x")
