"""The pipeline behind ``optimize`` (issue 15, item 3): each recipe is a list of named passes
over one context; ``optimize`` only builds the context and runs them; artifacts are written
by ``kernelize.deploy``."""

from __future__ import annotations

import inspect
import json

import onnx_ir as ir
import pytest
import torch
import transformers

import kernelize
from kernelize import api, pipeline
from kernelize.errors import UsageError
from kernelize.frontends import torch as torch_frontend


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")
    module = transformers.BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 8))
    model = torch_frontend.capture(module, {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)})
    return ir.to_proto(model)


def _names(passes):
    return [p.__name__ for p in passes]


@pytest.mark.parametrize("recipe", api.RECIPES)
def test_every_recipe_is_a_list_of_named_passes(recipe):
    names = _names(pipeline.RECIPES[recipe])
    assert len(set(names)) == len(names)
    assert names[:3] == ["check_options", "capture", "canonicalize"]
    assert names[-2:] == ["report", "write"]
    assert ("approximate" in names) == (recipe != "exact")
    assert names.index("fuse") < names.index("lower") < names.index("verify") < names.index("latency")
    assert all(step.__module__ == "kernelize.pipeline" and step.__doc__ for step in pipeline.RECIPES[recipe])


def test_named_rewrites_approximate_whatever_the_recipe():
    assert "approximate" in _names(pipeline.passes_for(pipeline.Options(recipe="exact",
                                                                        rewrites=["attention=linear:hedgehog"])))
    assert "approximate" not in _names(pipeline.passes_for(pipeline.Options(recipe="exact")))
    with pytest.raises(UsageError, match="unknown recipe"):
        pipeline.passes_for(pipeline.Options(recipe="bogus"))
    with pytest.raises(UsageError, match="unknown backend"):
        pipeline.passes_for(pipeline.Options(backend="bogus"))


def test_optimize_is_short():
    assert len(inspect.getsource(api.optimize).splitlines()) < 40


def test_passes_share_one_context(bert):
    """The first passes of the exact recipe, run by hand: each leaves its results, report
    sections and timings in the context for the next."""
    said = []
    ctx = pipeline.Context(bert, None, pipeline.Options(), said.append)
    upto = _names(pipeline.EXACT).index("fuse") + 1
    ctx = pipeline.run(pipeline.EXACT[:upto], ctx)
    assert said == ["loading model", "canonicalizing", "fusing"]
    assert list(ctx.timings) == ["capture_s", "canonicalize_s", "fuse_s", "optimize_s"]
    assert ctx.original is not None and ctx.canonical is not None and ctx.fused is not None
    assert {s.kind for s in ctx.sites} >= {"attention", "normalization"}
    assert {"canonicalization", "custom_rewrites", "sites", "near_misses", "summary"} <= set(ctx.report)
    # a pass of one's own runs on the same context
    seen = []

    def count_nodes(ctx):
        seen.append(len(list(ctx.model.graph)))
        return ctx

    ctx = pipeline.run([count_nodes, pipeline.lower, count_nodes], ctx)
    assert len(seen) == 2 and "lowered" in ctx.report and "lower_s" in ctx.timings


def test_report_sections_and_progress_in_their_order(bert, tmp_path):
    said = []
    result = kernelize.optimize(bert, output_dir=tmp_path / "out", measure_latency=False, progress=said.append)
    assert said == ["loading model", "canonicalizing", "fusing", "lowering for ort", "verifying against the original",
                    f"writing {tmp_path / 'out'}"]
    expected = ["model", "sites", "near_misses", "summary", "recipe", "backend", "canonicalization", "lowered",
                "custom_rewrites", "end_to_end", "tolerance", "timings", "size"]
    assert list(result.report) == expected
    assert list(json.loads((tmp_path / "out" / "report.json").read_text())) == expected
    assert list(result.report["timings"]) == ["capture_s", "canonicalize_s", "fuse_s", "optimize_s", "lower_s",
                                              "verify_s"]


def test_moved_names_are_still_importable():
    from kernelize.deploy import archive, artifact, export

    assert api.write_artifact is export.write_artifact and api.write_tvm_artifact is export.write_tvm_artifact
    assert api.load_model is pipeline.load_model and api.LATENCY_SHAPE == (1, 128)
    assert api.RECIPES == ("exact", "fast", "edge")
    assert artifact.pack is archive.pack and artifact.unpack is archive.unpack
    with pytest.raises(AttributeError):
        artifact.no_such_name  # noqa: B018
