"""The C++ runtime reads manifest.json: every key it looks up must be a field effx writes (a rename on the
Python side breaks the device runner, which cannot be run here)."""

import re
from pathlib import Path

from effx.core.manifest import Manifest
from effx.core.spec import ModelSpec

SOURCE = Path(__file__).resolve().parents[1] / "runtimes" / "cpp" / "src" / "bundle.cpp"


def _schema_fields(schema: dict) -> set[str]:
    names: set[str] = set()
    for part in [schema, *schema.get("$defs", {}).values()]:
        names |= set(part.get("properties", {}))
    return names


def test_every_manifest_key_the_cpp_runtime_reads_exists():
    text = SOURCE.read_text()
    keys = set(re.findall(r'\b(?:get|get_or)<[^>]+>\([^,]+,\s*"([a-z_]+)"', text))
    keys |= set(re.findall(r'\bat\([^,]+,\s*"([a-z_]+)"', text))
    keys |= set(re.findall(r'\.find\("([a-z_]+)"\)', text))
    assert {"schema_version", "kv_cache", "engine_built", "tensorrt_version", "sm", "protocol"} <= keys
    # build.plugins entries are free-form dicts: {"op", "plugin"} as targets/tensorrt/build.py and kit.py write them
    # kv_cache.layers[i].params is free-form too: {"window"} of ring layers, {"block_size", "num_blocks"} of paged
    # ones, {"factor"} of multiscale ones, as exporter/cache_plan.py writes them; kv_cache.params of an hourglass
    # holds {"first_ratio"} (decode_fine's condition; tests/exporter/test_export.py reads it from a real export)
    layer_params = {"window", "block_size", "num_blocks", "factor", "first_ratio"}
    known = _schema_fields(Manifest.model_json_schema()) | set(ModelSpec.model_fields) | {"model", "op", "plugin"}
    known |= layer_params
    assert keys - known == set(), f"bundle.cpp reads keys the manifest does not have: {sorted(keys - known)}"
