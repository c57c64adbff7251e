"""Property: a valid request works. Random valid specs (every kind, family and compatible cache layout) at
fp32, fp16 and int8 (static and dynamic calibration) go through `effx run` on tiny models and end in PASS.
CI runs a seeded sample; `python -m pytest -m sweep tests/cli/test_run_property.py` runs the larger sweep."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from effx.core.registry import ATTENTION, compatible_layouts
from effx.core.spec import RunSpec
from effx.core.spec_toml import spec_to_commented_toml
from tests.cli.test_cli import run_cli

PARAMS = {
    "linformer": st.fixed_dictionaries({"k": st.sampled_from([4, 8]),
                                        "sharing": st.sampled_from(["none", "headwise", "kv", "layerwise"])}),
    "local": st.fixed_dictionaries({"window": st.integers(1, 6)}),
    "block_sparse": st.fixed_dictionaries({"block_size": st.sampled_from([2, 4]), "stride_blocks": st.integers(0, 3),
                                           "global_blocks": st.integers(0, 1)}),
    "linear": st.sampled_from([{"feature_map": "elu"}, {"feature_map": "favor", "nb_features": 16}]),
    "hierarchical": st.sampled_from([{"factors": [1, 2]}, {"factors": [1, 3]}]),
}
PRECISIONS = [("fp32", "random"), ("fp16", "random"), ("int8", "random"), ("int8", "dynamic")]


@st.composite
def requests(draw):
    family = draw(st.sampled_from(["encoder", "decoder"]))
    kind = draw(st.sampled_from(sorted(k for k, e in ATTENTION.items() if family in e.families)))
    layouts = [x for x in compatible_layouts(kind, family) if x != "none"] if family == "decoder" else ["none"]
    layout = draw(st.sampled_from(layouts))
    heads = draw(st.sampled_from([2, 4]))
    model = {"family": family, "d_model": 32, "n_heads": heads, "n_layers": draw(st.integers(2, 3)),
             "d_ff": 64, "max_seq_len": 32, "vocab_size": 97, "seed": draw(st.integers(0, 5))}
    if family == "decoder":
        model["n_kv_heads"] = draw(st.sampled_from([1, heads]))
    cache = {"layout": layout} | ({"block_size": 4, "num_blocks": 24} if layout == "paged" else {})
    attention = {"kind": kind} | (draw(PARAMS[kind]) if kind in PARAMS else {})
    spec = RunSpec.parse({"model": model, "attention": attention, "kv_cache": cache})
    return spec, draw(st.sampled_from(PRECISIONS))


def _run(spec: RunSpec, precision: str, calib: str, tmp_path, capsys, monkeypatch) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(spec_to_commented_toml(spec))
    out = tmp_path / "out"
    code, stdout, err = run_cli(["run", str(path), "--precision", precision, "--calib", calib, "--calib-samples", "2",
                                 "--seq", "12", "-o", str(out), "--overwrite"], capsys, monkeypatch)
    assert code == 0 and stdout.rstrip().endswith("PASS"), (spec.to_dict(), precision, calib, err[-500:])


# no shrinking: each example is a whole `effx run`; a failure reports the example that failed, as drawn
_COMMON = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
               phases=[Phase.explicit, Phase.reuse, Phase.generate])


@settings(max_examples=4, **_COMMON)
@given(request=requests())
def test_random_valid_runs_pass_sample(request, tmp_path_factory, capsys, monkeypatch):
    spec, (precision, calib) = request
    _run(spec, precision, calib, tmp_path_factory.mktemp("run"), capsys, monkeypatch)


@pytest.mark.sweep
@settings(max_examples=40, **_COMMON)
@given(request=requests())
def test_random_valid_runs_pass_sweep(request, tmp_path_factory, capsys, monkeypatch):
    spec, (precision, calib) = request
    _run(spec, precision, calib, tmp_path_factory.mktemp("run"), capsys, monkeypatch)
