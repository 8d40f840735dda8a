"""The JSON Schema of the explain/trace report (kproxy/explain/schema.md), and a small
validator for the keywords it uses: type, enum, required, properties, items, $ref."""
from __future__ import annotations

import json
import re
from pathlib import Path

SCHEMA_MD = Path(__file__).resolve().parents[1] / "kproxy" / "explain" / "schema.md"
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
          "integer": int, "number": (int, float)}


def schema() -> dict:
    block = re.search(r"## JSON Schema.*?```json\n(.*?)```", SCHEMA_MD.read_text(), re.S)
    assert block, f"{SCHEMA_MD} has no JSON Schema block"
    return json.loads(block.group(1))


def validate(value, sch: dict = None, root: dict = None, path: str = "$") -> None:
    """Assert that ``value`` fits ``sch`` (default: the report schema)."""
    if sch is None:
        sch = root = schema()
    if "$ref" in sch:
        return validate(value, root["$defs"][sch["$ref"].split("/")[-1]], root, path)
    if "type" in sch:
        types = sch["type"] if isinstance(sch["type"], list) else [sch["type"]]
        assert any(isinstance(value, _TYPES[t]) and not (isinstance(value, bool) and t in ("integer", "number"))
                   for t in types), f"{path}: {value!r} is not {types}"
    if "enum" in sch:
        assert value in sch["enum"], f"{path}: {value!r} not in {sch['enum']}"
    if isinstance(value, dict):
        for key in sch.get("required", []):
            assert key in value, f"{path}: missing {key!r}"
        for key, sub in sch.get("properties", {}).items():
            if key in value:
                validate(value[key], sub, root, f"{path}.{key}")
    if isinstance(value, list) and "items" in sch:
        for i, item in enumerate(value):
            validate(item, sch["items"], root, f"{path}[{i}]")
