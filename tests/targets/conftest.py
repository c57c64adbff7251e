"""Shared by the TensorRT-readiness tests (test_compat, test_tensorrt_first_contact): tiny default exports made
once per session (exports cost most of these tests' time on a 2-core machine)."""

from __future__ import annotations

import pytest

from effx.exporter import export_model
from effx.models import build_model
from tests.helpers import decoder_spec, encoder_spec

SMALL = {"n_layers": 1, "d_model": 32, "max_seq_len": 32}
# the CI sample: ONNX Attention (encoder and decoder), a ring cache (integer Clip), an effx function with If
SAMPLE = {"enc-full": ("encoder", "full", None, {}, {}), "dec-full": ("decoder", "full", "contiguous", {}, {}),
          "dec-local-ring": ("decoder", "local", "ring", {"window": 5}, {})}


def small_spec(family, kind, layout, attention, cache, **model):
    small = SMALL | model
    return encoder_spec(kind, attention, **small) if family == "encoder" else \
        decoder_spec(kind, layout, attention, cache, **small)


@pytest.fixture(scope="session")
def trt_sample_exports(tmp_path_factory):
    """name -> (manifest, folder) of the sample exports (effx defaults: opset 23, effx functions kept)."""
    root = tmp_path_factory.mktemp("trt-sample")
    return {name: (export_model(build_model(small_spec(*case)), root / name), root / name)
            for name, case in SAMPLE.items()}
