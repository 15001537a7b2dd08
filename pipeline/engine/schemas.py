"""The data contracts between stages, as versioned pyarrow schemas.

`python -m pipeline.engine.schemas schemas/` renders them to JSON under `schemas/` (checked in; a test
keeps the two in sync). Stages validate what they write against these before committing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa

from pipeline.errors import SchemaError

SCHEMA_VERSION = 1

# Members of one webdataset sample (`<key>.<member>` inside the tar), per stage.
RAW_MEMBERS = ("jpg", "txt", "json")
FILTERED_MEMBERS = ("jpg", "txt", "json")
ENCODED_MEMBERS = ("image_tokens.npy", "text_tokens.npy", "clip_image.npy", "clip_text.npy", "txt", "json")

# dtype and shape of each array member of an encoded sample; names in shapes are fixed per run
# and recorded in the encode stage's `_plan.json` (grid², the text length, CLIP's embedding width).
ENCODED_ARRAYS = {
    "image_tokens.npy": ("uint16", ("image_tokens",)),
    "text_tokens.npy": ("uint16", ("text_len",)),
    "clip_image.npy": ("float16", ("embed_dim",)),
    "clip_text.npy": ("float16", ("embed_dim",)),
}

RAW_MANIFEST = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
    ],
    metadata={"stage": "ingest", "doc": "img2dataset's per-shard parquet: one row per URL-list row"},
)

FILTER_FACTS = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("sha256", pa.string()),
        ("phash", pa.uint64()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("source_shard", pa.string()),
    ],
    metadata={"stage": "filter", "doc": "what the filter's scan phase records per raw sample"},
)

FILTERED_MANIFEST = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("sha256", pa.string()),
        ("phash", pa.uint64()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("source_shard", pa.string()),
    ],
    metadata={"stage": "filter", "doc": "one row per sample of a filtered shard, in tar order"},
)

DECISIONS = pa.schema(
    [("key", pa.string()), ("reason", pa.string())],
    metadata={"stage": "filter", "doc": "every scanned sample of a raw shard and why it was dropped (null: kept)"},
)

ENCODED_MANIFEST = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("sha256", pa.string()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("clip_similarity", pa.float32()),
        ("text_length", pa.int32()),
    ],
    metadata={
        "stage": "encode",
        "doc": "one row per sample of an encoded shard, in tar order (text_length: BPE tokens before truncation)",
    },
)

LEDGER_RECORD = pa.schema(
    [
        ("shard", pa.string()),
        ("samples_in", pa.int64()),
        ("samples_out", pa.int64()),
        ("files", pa.list_(pa.string())),
        ("checksum", pa.string()),
        ("fingerprint", pa.string()),
        ("counts", pa.map_(pa.string(), pa.int64())),
        ("seconds", pa.float64()),
        ("finished_at", pa.float64()),
    ],
    metadata={"doc": "one committed shard: <stage>/_ledger/<shard>.json"},
)

ALL = {
    "raw_manifest": RAW_MANIFEST,
    "filter_facts": FILTER_FACTS,
    "filtered_manifest": FILTERED_MANIFEST,
    "filter_decisions": DECISIONS,
    "encoded_manifest": ENCODED_MANIFEST,
    "ledger_record": LEDGER_RECORD,
}


def validate_table(table: pa.Table, schema: pa.Schema, where: str) -> None:
    """Every field of `schema` present in `table` with the same type (extra columns allowed)."""
    for f in schema:
        if f.name not in table.column_names:
            raise SchemaError(f"{where}: column '{f.name}' is missing")
        got = table.schema.field(f.name).type
        if got != f.type and not (pa.types.is_null(got) and table.num_rows == 0):
            raise SchemaError(f"{where}: column '{f.name}' is {got}, expected {f.type}")


def validate_record(record: dict, schema: pa.Schema, where: str) -> None:
    """A dict that converts to one row of `schema` with no missing or unknown fields."""
    names = set(schema.names)
    if set(record) != names:
        raise SchemaError(f"{where}: fields {sorted(set(record) ^ names)} do not match the schema")
    row = {**record, "counts": list(record["counts"].items())} if "counts" in record else record
    try:
        pa.Table.from_pylist([row], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise SchemaError(f"{where}: {err}") from None


def render() -> dict[str, dict]:
    """Each schema as a JSON-able dict."""
    out = {}
    for name, schema in ALL.items():
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        out[name] = {
            "version": SCHEMA_VERSION,
            **meta,
            "fields": [{"name": f.name, "type": str(f.type)} for f in schema],
        }
    out["sample_members"] = {
        "version": SCHEMA_VERSION,
        "raw": list(RAW_MEMBERS),
        "filtered": list(FILTERED_MEMBERS),
        "encoded": list(ENCODED_MEMBERS),
        "encoded_arrays": {k: {"dtype": d, "shape": list(s)} for k, (d, s) in ENCODED_ARRAYS.items()},
    }
    return out


def write_all(folder: Path) -> None:
    from pipeline.config.recipe import Recipe

    folder.mkdir(parents=True, exist_ok=True)
    for name, body in render().items():
        (folder / f"{name}.json").write_text(json.dumps(body, indent=2) + "\n")
    (folder / "recipe.json").write_text(json.dumps(Recipe.model_json_schema(), indent=2) + "\n")


if __name__ == "__main__":
    write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas"))
