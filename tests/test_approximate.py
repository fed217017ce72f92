"""The approximate-rewrite pipeline: sites, calibration, candidates, selection under the
budget, the report and the command line. A test-only method perturbs the softmax scale by a
chosen amount, so the errors it causes are known in advance and every branch of the
selection can be driven; the real methods have their own test files."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
import transformers

import kernelize
from kernelize import cli
from kernelize.errors import UsageError
from kernelize.frontends import torch as torch_frontend
from kernelize.methods.base import METHODS, Fitted, Method, exact_attention_cost
from kernelize.passes import approximate, calibrate, select
from kernelize.passes.canonicalize import canonicalize

LAYERS, HIDDEN, HEADS, VOCAB = 3, 64, 4, 100


TEST_METHODS = ["test:drift", "test:never"]


@pytest.fixture(autouse=True)
def fixed_speed(monkeypatch):
    """The test method runs the exact kernel, so its measured speed says nothing: 2x at the
    site (2 ms -> 1 ms) and end to end."""
    monkeypatch.setattr(approximate, "measure_times", lambda *a, **k: (2.0, 1.0))
    monkeypatch.setattr(select, "_compare_latency",
                        lambda *a, **k: {"speedup": 2.0, "note": "fixed by the test"})


@pytest.fixture(scope="module", autouse=True)
def test_methods():
    """The test methods exist only while this module runs (defining a Method registers it)."""

    class ScaleDrift(Method):
        """Exact attention with the scale multiplied by (1 + drift): an 'approximation' of known size."""

        name = "test:drift"
        kind = "attention"

        def fit(self, captured, drift=0.1, **_):
            return Fitted(self.name, "Attention", {"scale": captured.scale * (1.0 + drift)}, [], {"drift": drift})

        def cost(self, fitted, shape):
            return exact_attention_cost(shape) / 4

    class NotApplicable(Method):
        name = "test:never"
        kind = "attention"

        def fit(self, captured, **_):
            return "never applies (test)"

        def cost(self, fitted, shape):
            return 1.0

    yield
    for name in TEST_METHODS:
        METHODS.pop(name, None)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                                     max_position_embeddings=64, attn_implementation="eager")
    module = transformers.BertModel(config).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    model = torch_frontend.capture(module, {"input_ids": ids, "attention_mask": torch.ones(2, 16, dtype=torch.long)})
    return ir.to_proto(model)


def _calib(n=8, seq=24, seed=0):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, VOCAB, (n, seq)).astype(np.int64),
            "attention_mask": np.ones((n, seq), np.int64)}


def test_sites_carry_layers(bert):
    model = ir.from_proto(bert)
    canonicalize(model)
    sites, misses = approximate.find(model)
    attention = [s for s in sites if s.kind == "attention"]
    projections = [s for s in sites if s.kind == "projection"]
    assert [s.layer for s in attention] == [0, 1, 2]
    # Q, K, V, O, FFN in, FFN out per layer (+ the pooler, after the last layer)
    assert len(projections) == 6 * LAYERS + 1
    for layer in range(LAYERS):
        assert sum(p.layer == layer for p in projections) >= 6
    sites, _ = approximate.find(model, layers={1})
    assert {s.layer for s in sites} == {1}


def test_budget_keeps_error_within_max_error(bert):
    result = kernelize.optimize(bert, recipe="fast", calib=_calib(), max_error=0.02,
                                rewrites=["attention=test:drift|test:never"], measure_latency=False,
                                method_options={"test:drift": {"drift": 0.02}})
    section = result.report["approximate"]
    assert section["mode"] == "budget" and section["metric"] == "relative_l2"
    chosen = section["chosen"]
    assert chosen, section["summary"]
    assert section["held_out_error"] <= 0.02
    for site in section["sites"]:
        never = next(c for c in site["candidates"] if c["method"] == "test:never")
        assert never["status"] == "not applicable" and "never applies" in never["reason"]
        drift = next(c for c in site["candidates"] if c["method"] == "test:drift")
        assert drift["site_error"] > 0 and drift["end_to_end_error"] > 0
    # the rewritten model carries the drifted scale at the chosen sites, exact elsewhere
    scales = [n.attributes["scale"].value for n in result.model.graph if n.op_type in ("Attention",
                                                                                        "MultiHeadAttention")]
    assert len(scales) == LAYERS


def test_budget_too_small_leaves_every_site_exact(bert):
    result = kernelize.optimize(bert, recipe="fast", calib=_calib(), max_error=1e-7,
                                rewrites=["attention=test:drift"], measure_latency=False)
    section = result.report["approximate"]
    assert section["chosen"] == {}
    assert "all sites stay exact" in section["summary"]
    assert all("exceeds" in s["why_exact"] for s in section["sites"])
    assert all(s["rewrite"] == "MultiHeadAttention" for s in result.report["sites"] if s["kind"] == "attention")


def test_back_off_when_combined_error_exceeds_budget(bert, monkeypatch):
    # an optimistic estimate (every fitted candidate chosen) must be caught by the held-out
    # verification and backed off until the measured error fits
    def choose_all(sites, candidates, budget, forced, goal):
        return {s.id: c for s in sites for c in candidates[s.id] if c.fitted is not None}

    monkeypatch.setattr(select, "_choose", choose_all)
    options = {"test:drift": {"drift": 0.3}}
    first = kernelize.optimize(bert, recipe="fast", calib=_calib(), max_error=10.0,
                               rewrites=["attention=test:drift"], measure_latency=False, method_options=options)
    combined = first.report["approximate"]["held_out_error"]
    assert len(first.report["approximate"]["chosen"]) == LAYERS and combined > 0
    budget = combined * 0.9
    result = kernelize.optimize(bert, recipe="fast", calib=_calib(), max_error=budget,
                                rewrites=["attention=test:drift"], measure_latency=False, method_options=options)
    section = result.report["approximate"]
    assert section["backed_off"], section["summary"]
    assert section["backed_off"][0]["combined_error"] == pytest.approx(combined)
    assert len(section["chosen"]) < LAYERS
    assert section["held_out_error"] <= budget


def test_forced_rewrite_on_chosen_layers(bert):
    result = kernelize.optimize(bert, recipe="fast", calib=_calib(), rewrites=["attention=test:drift"],
                                layers="1-2", measure_latency=False)
    section = result.report["approximate"]
    assert section["mode"].startswith("forced") and section["max_error"] is None
    assert sorted(section["chosen"]) == ["attention[1]", "attention[2]"]
    assert [s["layer"] for s in section["sites"]] == [1, 2]


def test_synthesized_calibration_is_stated(bert):
    report = kernelize.inspect(bert, rewrites=["attention=test:drift"])
    section = report["approximate"]
    assert section["calibration"].startswith("synthesized")
    assert all(s["chosen"] is None for s in section["sites"])
    assert all(c["end_to_end_error"] is not None for s in section["sites"] for c in s["candidates"]
               if c["method"] == "test:drift")


def test_user_metric_function(bert):
    seen = []

    def first_token_drift(reference, candidate, feeds):
        seen.append(sorted(feeds))
        name = next(iter(reference))
        return float(np.abs(reference[name][:, 0] - candidate[name][:, 0]).max())

    result = kernelize.optimize(bert, recipe="fast", calib=_calib(), max_error=10.0, metric=first_token_drift,
                                rewrites=["attention=test:drift"], measure_latency=False)
    assert result.report["approximate"]["metric"] == "first_token_drift"
    assert seen and seen[0] == ["attention_mask", "input_ids"]


@pytest.mark.parametrize("kwargs, message", [
    ({"rewrites": ["attention=nonsense"]}, "unknown attention rewrite"),
    ({"rewrites": ["softmax=linear"]}, "bad --rewrite"),
    ({"layers": "a-b"}, "bad --layers"),
    ({"metric": "nope"}, "unknown metric"),
    ({"calib": {"input_ids": np.zeros((4, 8), np.int64)}}, "lack attention_mask"),
    ({"calib": {"input_ids": np.zeros((4, 8), np.int64), "attention_mask": np.ones((4, 8), np.float32)}},
     "attention_mask is float32"),
    ({"calib": {"input_ids": np.zeros((1, 8), np.int64), "attention_mask": np.ones((1, 8), np.int64)}},
     "at least 2 samples"),
])
def test_bad_approximate_options(bert, kwargs, message):
    with pytest.raises(UsageError, match=message):
        kernelize.optimize(bert, recipe="fast", measure_latency=False, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": "abc"}, "bad --layers"),
    ({"layers": "9-3"}, "bad --layers"),
    ({"max_error": float("nan")}, "--max-error must be a number"),
    ({"max_error": -1.0}, "--max-error must be a number"),
    ({"metric": "bogus"}, "unknown metric"),
    ({"calib": "missing.npz"}, "calibration file not found"),
])
@pytest.mark.parametrize("recipe", ["exact", "fast"])
def test_options_are_checked_before_any_work(bert, monkeypatch, recipe, kwargs, message):
    """Bad options fail at once, whatever the recipe (with ``exact`` they used to pass)."""
    monkeypatch.setattr("kernelize.pipeline.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UsageError, match=message):
        kernelize.optimize(bert, recipe=recipe, measure_latency=False, **kwargs)


def test_cli_fast_recipe_with_calib_file(bert, tmp_path, capsys):
    model = tmp_path / "bert.onnx"
    model.write_bytes(bert.SerializeToString())
    calib = tmp_path / "calib.npz"
    np.savez(calib, **_calib())
    out = tmp_path / "out"
    code = cli.main(["optimize", str(model), "--recipe", "fast", "--calib", str(calib), "--max-error", "0.05",
                     "--rewrite", "attention=test:drift", "-o", str(out), "--no-latency", "-q"])
    text = capsys.readouterr().out
    assert code == 0
    assert "approximate rewrites (budget; metric relative_l2 <= 0.05" in text
    report = json.loads((out / "report.json").read_text())
    assert report["approximate"]["calibration"] == f"user: {calib}"
    code = cli.main(["optimize", str(model), "--recipe", "fast", "--calib", str(tmp_path / "missing.npz"),
                     "-o", str(tmp_path / "out2"), "-q"])
    assert code == 2
    assert "calibration file not found" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_calibration_split_is_disjoint():
    model = ir.from_proto(_tiny_signature())
    calib = calibrate.load(model, None, samples=6, seq=10)
    assert calib.samples == 6 and calib.seq == 10
    assert calib.fit == slice(0, 3) and calib.held_out == slice(3, 6)
    assert not np.array_equal(calib.feeds["x"][:3], calib.feeds["x"][3:])


def _tiny_signature():
    import onnx

    node = onnx.helper.make_node("Identity", ["x"], ["out"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                   ["batch", "seq"])],
                                   [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT,
                                                                       ["batch", "seq"])])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])


def test_rpe_rewrite_through_the_pipeline():
    """MPT's ALiBi attention: the relative-position rewrite is fitted on captured activations
    (the Toeplitz vector rebuilt from the runtime length) and the rewritten model runs."""
    from test_positional import build_mpt, export, feeds_of

    _, model = export(build_mpt)
    calib = {k: np.concatenate([v, v[::-1]]) for k, v in feeds_of(4, 24).items()}
    result = kernelize.optimize(ir.to_proto(model), rewrites=["attention=rpe:elu"], calib=calib,
                                measure_latency=False)
    section = result.report["approximate"]
    assert sorted(section["chosen"]) == ["attention[0]", "attention[1]"]
    for site in section["sites"]:
        assert 0 < site["site_error"] < 0.2 and 0 < site["end_to_end_error"] < 0.2
    rpe_nodes = [n for n in result.model.graph if n.op_type == "RPEAttention"]
    assert len(rpe_nodes) == 2
    # causal ALiBi: ONNX Runtime evaluates it as a decay (the same operator, not by FFT)
    assert all(n.attributes["decay"].as_int() == 1 for n in rpe_nodes)
    assert 0 < section["held_out_error"] < 0.2


def test_lut_with_too_little_calibration_is_refused(bert):
    tiny = _calib(n=2, seq=8)  # 8 tokens in the fitting half: fewer than LUT's 64
    with pytest.raises(UsageError, match="LUT needs at least"):
        kernelize.optimize(bert, calib=tiny, rewrites=["projection=lut"], measure_latency=False)


def test_lut_refused_at_one_site_only_leaves_that_site_dense(bert):
    # 4 x 24 tokens fit the token projections; the pooler sees one row per sample (4 rows)
    result = kernelize.optimize(bert, calib=_calib(n=8, seq=24), rewrites=["projection=lut"], layers="2-3",
                                measure_latency=False)
    section = result.report["approximate"]
    pooler = section["sites"][-1]
    assert pooler["chosen"] is None
    assert "LUT needs at least" in pooler["candidates"][0]["reason"]
    assert sum(s["chosen"] == "projection:lut" for s in section["sites"]) == len(section["sites"]) - 1


def test_edge_recipe_selects_projections_under_the_budget(bert):
    """``--recipe edge``: per projection the rewrite that saves the most weight bytes within the
    budget; a budget too small for every site leaves the rest dense with the reason; a budget
    nothing fits leaves all dense. The report lists each projection's choice, error and bytes."""
    calib, cache = _calib(n=8, seq=24), {}
    sections = {}
    for budget in (0.05, 0.002, 1e-7):
        result = kernelize.optimize(bert, recipe="edge", calib=calib, max_error=budget, measure_latency=False,
                                    calibration_cache=cache)
        sections[budget] = section = result.report["approximate"]
        assert section["held_out_error"] <= budget
        assert all(s["kind"] == "projection" for s in section["sites"])
        for site in section["sites"]:
            fitted = [c for c in site["candidates"] if c.get("weight_bytes")]
            assert fitted and all(c["weight_bytes"] * 4 <= c["dense_weight_bytes"] for c in fitted
                                  if c["method"] == "projection:shiftadd")
            if site["chosen"]:
                assert site["chosen"] in ("projection:shiftadd", "projection:lut")
                assert site["end_to_end_error"] <= budget
            else:
                assert "budget" in site["why_exact"] or "back-off" in site["why_exact"]
        ops = [n.op_type for n in result.model.graph if n.domain == "kernelize"]
        assert ops.count("ShiftAddLinear") + ops.count("LUTLinear") == len(section["chosen"])
    counts = {budget: len(section["chosen"]) for budget, section in sections.items()}
    total = len(sections[0.05]["sites"])
    assert counts[0.05] == total and 0 < counts[0.002] < total and counts[1e-7] == 0, counts


def test_projection_with_a_weight_that_is_not_constant_is_left_dense():
    import onnx

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, 8])
    w = onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, 8])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x, w], [y])
    model = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]))
    sites, misses = approximate.find(model, kinds=("projection",))
    assert not sites
    assert [m.reason for m in misses] == ["projection weight is not a constant: left dense"]


def test_int8_projections_through_the_pipeline(bert):
    """``--rewrite projection=int8`` without a budget: every projection becomes an Int8Linear
    with its measured error, and the result (lowered for ONNX Runtime) runs each on the
    integer kernel."""
    result = kernelize.optimize(bert, calib=_calib(n=8, seq=24), rewrites=["projection=int8"], measure_latency=False)
    section = result.report["approximate"]
    sites = section["sites"]
    assert sites and all(s["chosen"] == "projection:int8" for s in sites)
    assert 0 < section["held_out_error"] < 0.05
    assert all(0 < s["end_to_end_error"] < 0.05 for s in sites)
    assert section["weight_bytes_saved"] > 0
    kernels = [n.op_type for n in result.model.graph]
    assert kernels.count("DynamicQuantizeMatMul") == len(sites) and "MatMul" not in kernels, kernels


def test_int8_under_a_budget_and_tvm_fallback(bert):
    """Under a budget the int8 projections are admitted while the measured error fits; for a
    TVM CPU target without int8 dot products nothing is rewritten and the report says why."""
    calib, cache = _calib(n=8, seq=24), {}
    result = kernelize.optimize(bert, calib=calib, rewrites=["projection=int8"], max_error=0.01,
                                measure_latency=False, calibration_cache=cache)
    section = result.report["approximate"]
    assert section["held_out_error"] <= 0.01
    assert section["chosen"], "no int8 projection fits a 1% budget"
    model = ir.from_proto(bert)
    canonicalize(model)
    _, tvm_section = select.approximate_model(
        model, "fast", calib=calib, rewrites={"projection": ["projection:int8"]}, max_error=0.01,
        backend="tvm", target='{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver2"}')
    assert not tvm_section["chosen"]
    assert any("no int8 dot-product instructions" in note for note in tvm_section["notes"])


def test_int8_on_a_model_without_constant_weights_rewrites_nothing(tmp_path, capsys):
    """``--rewrite projection=int8`` where no MatMul has a constant weight: exit 0, the model
    written unchanged, and the reason in the report."""
    import onnx

    from kernelize import cli

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", 8])
    w = onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", 8])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x, w], [y])
    path = tmp_path / "model.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]), path)
    code = cli.main(["optimize", str(path), "--rewrite", "projection=int8", "-o", str(tmp_path / "out"),
                     "--no-latency"])
    out = capsys.readouterr().out
    assert code == 0
    assert "no site for the approximate rewrites (projection weight is not a constant: left dense)" in out
    written = onnx.load(tmp_path / "out" / "model.onnx")
    assert [n.op_type for n in written.graph.node] == ["MatMul"]


def test_sequential_calibration_refits_in_model_order(bert):
    """``sequential=True`` (off by default: on MiniLM it did not lower the combined error)
    refits every chosen projection on the activations of the model with the earlier layers
    already rewritten; the result is marked and its held-out error is measured like any other."""
    calib = calibrate.load(_canonical(bert), _calib(n=8, seq=24))
    results = {}
    for sequential in (False, True):
        _, section = select.approximate_model(_canonical(bert), "fast", calib=calib,
                                              rewrites={"projection": ["projection:int8"]}, sequential=sequential)
        results[sequential] = section
        assert section["chosen"] and all(s["sequential"] is sequential for s in section["sites"] if s["chosen"])
        assert 0 < section["held_out_error"] < 0.05
    assert results[True]["held_out_error"] != results[False]["held_out_error"]


def _canonical(proto):
    model = ir.from_proto(proto)
    canonicalize(model)
    return model
