"""The example specs the README uses load, build and run."""

from pathlib import Path

import pytest
import torch

from effx.core.spec import RunSpec
from effx.models import build_model

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.toml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_builds_and_runs(path):
    spec = RunSpec.from_toml(path)
    model = build_model(spec)
    ids = torch.randint(0, spec.model.vocab_size, (2, 12))
    out = model(ids)
    assert torch.isfinite(out).all()
