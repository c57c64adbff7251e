"""Decode caches written in place on ONNX Runtime (IOBinding over the graphs' `aliases`) against the same
graphs run functionally (new present tensors fed back) and the PyTorch model: token by token, for every
layout whose buffers the host owns, and by buffer identity (the arrays ONNX Runtime wrote are the host's)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from effx.core.protocol import DecodeDriver, greedy
from effx.core.spec import RunSpec
from effx.exporter import export_model
from effx.exporter.onnx_export import in_place_aliases
from effx.models.transformer import build_model
from effx.targets.ort import OrtRunner
from tests.exporter.ort_helpers import ReferenceRunner
from tests.helpers import decoder_spec
from tests.oracle import sharpen

PAGED = {"block_size": 4, "num_blocks": 32}


def _hybrid() -> RunSpec:
    spec = decoder_spec("full", "paged", cache=PAGED).to_dict()
    spec["layers"] = {"pattern": ["local", "local", "global"], "types": {
        "local": {"attention": {"kind": "local", "window": 5}, "kv_cache": {"layout": "ring"}},
        "global": {"attention": {"kind": "full"}, "kv_cache": {"layout": "paged"} | PAGED}}}
    return RunSpec.parse(spec)


CASES = {
    "contiguous": lambda: decoder_spec("full", "contiguous"),
    "ring": lambda: decoder_spec("local", "ring", {"window": 5}),
    "paged": lambda: decoder_spec("local", "paged", {"window": 5}, PAGED),
    "hybrid-ring-paged": _hybrid,
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    model = sharpen(build_model(CASES[request.param]()))
    folder = tmp_path_factory.mktemp(request.param) / "onnx"
    return model, folder, export_model(model, folder)


def _ids(model, batch=2, n=24, seed=0):
    return np.random.default_rng(seed).integers(0, model.spec.model.vocab_size, (batch, n), dtype=np.int64)


def test_every_host_buffer_write_is_an_alias(exported):
    _, folder, manifest = exported
    decode = manifest.graphs["decode"]
    buffers = {t.output: t.input for t in manifest.kv_cache.tensors}
    assert decode.aliases == buffers  # every cache tensor of these layouts is written in place
    assert in_place_aliases(onnx.load(str(folder / decode.file))) == buffers


def test_in_place_equals_copying_and_pytorch_token_by_token(exported):
    model, folder, manifest = exported
    ids = _ids(model)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    logits = {}
    for in_place in (True, False):
        with OrtRunner(folder, manifest, threads=1, in_place=in_place) as runner:
            driver = DecodeDriver(manifest, 2, ids.shape[1])
            steps = [driver.prefill(runner.infer, ids[:, :5])["logits"]]
            held = dict(driver.cache)  # the host's buffers after the prefill
            for t in range(5, ids.shape[1]):
                before = {k: v.copy() for k, v in driver.cache.items()}
                steps.append(driver.step(runner.infer, ids[:, t:t + 1])["logits"])
                for name, buf in driver.cache.items():
                    assert (buf is held[name]) == in_place, name  # the same array, written by ONNX Runtime
                    assert not np.array_equal(buf, before[name]), name  # the step wrote its token
            logits[in_place] = np.concatenate(steps, 1)
    assert np.abs(logits[True] - logits[False]).max() <= 1e-5
    assert np.abs(logits[True] - ref).max() <= 1e-4
    assert (logits[True].argmax(-1) == ref.argmax(-1)).all()


def test_greedy_tokens_in_place_equal_a_runtime_that_cannot_alias(exported):
    model, folder, manifest = exported
    prompt = _ids(model, n=6, seed=1)
    with OrtRunner(folder, manifest, threads=1) as ort_runner, ReferenceRunner(folder, manifest) as reference:
        assert ort_runner.environment()["cache_updates"] == "in place (IOBinding)"
        tokens = [greedy(r.infer, manifest, prompt, 10) for r in (ort_runner, reference)]
    assert (tokens[0] == tokens[1]).all()


def test_ring_steps_of_several_tokens_and_resizing(tmp_path):
    """A ring of window + chunk - 1 slots takes a chunk in one graph call (write, then attend); longer steps
    are split; set_chunk shrinks the ring to the window and decoding goes on unchanged."""
    model = sharpen(build_model(decoder_spec("local", "ring", {"window": 5})))
    manifest = export_model(model, tmp_path / "onnx")
    ids = _ids(model, n=40)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    calls = []
    with OrtRunner(tmp_path / "onnx", manifest, threads=1) as runner:
        def infer(feed, graph):
            calls.append(feed["input_ids"].shape[1])
            return runner.infer(feed, graph)

        driver = DecodeDriver(manifest, 2, 40, chunk=8)
        assert driver.cache["past.0.key"].shape[2] == 5 + 8 - 1
        out = [driver.prefill(infer, ids[:, :3])["logits"], driver.step(infer, ids[:, 3:11])["logits"],
               driver.step(infer, ids[:, 11:30])["logits"]]
        assert calls == [3, 8, 8, 8, 3]  # 19 tokens in pieces of at most 8
        driver.set_chunk(1)
        assert driver.cache["past.0.key"].shape[2] == 5
        out += [driver.step(infer, ids[:, t:t + 1])["logits"] for t in range(30, 40)]
    assert np.abs(np.concatenate(out, 1) - ref).max() <= 1e-4


def test_a_write_with_another_reader_is_not_aliased():
    """The alias rule is structural: if anything but Shape reads the buffer besides its ScatterND, the
    runtime must not write it in place."""
    h, tp = onnx.helper, onnx.TensorProto
    nodes = [h.make_node("ScatterND", ["past", "idx", "upd"], ["present"]),
             h.make_node("ReduceSum", ["past"], ["total"]), h.make_node("Shape", ["past"], ["shape"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("past", tp.FLOAT, [4, 2]),
                                      h.make_tensor_value_info("idx", tp.INT64, [1, 1]),
                                      h.make_tensor_value_info("upd", tp.FLOAT, [1, 2])],
                         [h.make_tensor_value_info(n, tp.FLOAT, None) for n in ("present", "total")])
    model = h.make_model(graph)
    assert in_place_aliases(model) == {}
    del model.graph.node[1]
    del model.graph.output[1]
    assert in_place_aliases(model) == {"present": "past"}  # Shape reads no values
