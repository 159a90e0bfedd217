"""flashfuse.explain and the Report: content, source lines, near-miss reasons, graph breaks, code
before/after, JSON, drawing, and no leftover compiled state."""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn as nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import flashfuse
import flashfuse_toy_pass as toy
from flashfuse.report import Report

HERE = os.path.abspath(__file__)
EXAMPLE = os.path.join(os.path.dirname(HERE), os.pardir, "examples", "explain_toy.py")


def line_of(marker: str, path: str = HERE) -> int:
    """The line number of the one line in `path` that carries `marker`."""
    with open(path) as f:
        lines = [i for i, line in enumerate(f, 1) if marker in line and "line_of(" not in line]
    assert len(lines) == 1, (marker, lines)
    return lines[0]


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = torch.relu(self.lin(x)) * 2  # @fused-1
        z = torch.relu(y) * 3  # @near-miss-3
        return z


class ToyWithBreak(nn.Module):
    def forward(self, x):
        y = torch.relu(x) * 2  # @before-break
        print("a graph break")  # @break
        return torch.relu(y + 1) * 2  # @after-break


def test_report_lists_fusion_with_source_line_and_description():
    report = flashfuse.explain(ToyModel(), torch.randn(4, 8), options=toy.OPTIONS)
    assert report.count("relu_mul") == 1 and report.count() == 1
    assert report.counts() == {"relu_mul": 1}
    (match,) = report.matches
    assert match.fusion == "relu_mul"
    assert match.source == f"{HERE}:{line_of('@fused-1')}"
    assert match.description == "relu(x) * 2 as one op, 4x8"
    assert match.details == {"factor": 2, "shape": "4x8"}
    assert "torch.relu(self.lin(x)) * 2" in match.code


def test_near_miss_has_precise_reason_and_line():
    report = flashfuse.explain(ToyModel(), torch.randn(4, 8), options=toy.OPTIONS)
    (miss,) = report.near_misses
    assert miss.fusion == "relu_mul"
    assert miss.reason == "the multiplier is 3, not 2"
    assert miss.source == f"{HERE}:{line_of('@near-miss-3')}"


def test_print_is_a_readable_summary():
    report = flashfuse.explain(ToyModel(), torch.randn(4, 8), options=toy.OPTIONS)
    text = str(report)
    assert text.splitlines()[0] == ("flashfuse report: 1 graph(s), 1 fusion(s), 1 near-miss(es), "
                                    "0 graph break(s)")
    assert f"fused     relu_mul at test_explain.py:{line_of('@fused-1')}: relu(x) * 2 as one op, 4x8" in text
    assert (f"near-miss relu_mul at test_explain.py:{line_of('@near-miss-3')}: not fused: "
            "the multiplier is 3, not 2") in text
    assert "code before" not in text  # the code is there on request only
    assert "code before the passes" in report.format(code=True)


def test_code_before_and_after_the_passes():
    report = flashfuse.explain(ToyModel(), torch.randn(4, 8), options=toy.OPTIONS)
    (graph,) = report.graphs
    assert "torch.relu" in graph.code_before and "relu_times_two" not in graph.code_before
    assert "flashfuse_toy.relu_times_two.default" in graph.code_after
    assert "aten.relu.default" in graph.code_after  # the near-miss relu stays
    assert isinstance(graph.graph_after, torch.fx.GraphModule)


def test_graph_breaks_are_reported_with_reason_and_line():
    report = flashfuse.explain(ToyWithBreak(), torch.randn(3), options=toy.OPTIONS)
    assert len(report.graphs) == 2
    assert report.count("relu_mul") == 2
    assert [m.source for m in report.matches] == [f"{HERE}:{line_of('@before-break')}",
                                                  f"{HERE}:{line_of('@after-break')}"]
    (brk,) = report.graph_breaks
    assert brk.graph == 0
    assert brk.source == f"{HERE}:{line_of('@break')}"
    assert "print" in brk.reason
    assert f"graph break after graph 0 at test_explain.py:{line_of('@break')}" in str(report)


def test_graph_break_with_no_graph_before_it_is_counted():
    def starts_with_a_break(x):
        print("nothing captured before this")  # @first-break
        y = torch.relu(x) * 2
        print("a second break")  # @second-break
        return y + 1

    report = flashfuse.explain(starts_with_a_break, torch.randn(3), options=toy.OPTIONS)
    assert [(b.graph, b.source) for b in report.graph_breaks] == [
        (None, f"{HERE}:{line_of('@first-break')}"), (0, f"{HERE}:{line_of('@second-break')}")]
    lines = str(report).splitlines()
    assert lines[0].endswith("2 graph break(s)")
    assert lines[1].startswith(f"graph break with no graph before it at test_explain.py:{line_of('@first-break')}")
    assert lines[2] == "graph 0:"


def test_explain_compiles_nothing(monkeypatch):
    # The default remainder is Inductor; explain must decide as under Inductor but never run it.
    import torch._inductor.compile_fx as compile_fx

    def no_inductor(*args, **kwargs):
        raise AssertionError("explain ran Inductor")

    monkeypatch.setattr(compile_fx, "compile_fx", no_inductor)
    report = flashfuse.explain(ToyModel(), torch.randn(4, 8), options={"passes": ["relu_mul"]})
    assert report.count("relu_mul") == 1
    assert report.notes == []


def test_to_dict_is_json_serialisable():
    report = flashfuse.explain(ToyWithBreak(), torch.randn(3), options=toy.OPTIONS)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["counts"] == {"relu_mul": 2}
    assert [m["graph"] for m in data["matches"]] == [0, 1]
    assert data["graphs"][1]["matches"][0]["description"] == "relu(x) * 2 as one op, 3"
    assert "relu_times_two" in data["graphs"][0]["code_after"]
    assert data["graph_breaks"][0]["source"].endswith(f"test_explain.py:{line_of('@break')}")
    assert data["config"]["passes"] == ["relu_mul"] and data["config"]["remainder"] == "eager"


def test_to_dict_turns_pass_details_into_json():
    from flashfuse.report import GraphReport

    graph = GraphReport(index=0)
    graph.add_match("attention", None, "causal", dtype=torch.float16, softcap=float("inf"),
                    shape=torch.Size([2, 3]), scale=torch.tensor(0.5))
    report = Report()
    report.graphs.append(graph)
    details = json.loads(json.dumps(report.to_dict()))["matches"][0]["details"]
    assert details == {"dtype": "torch.float16", "softcap": "inf", "shape": [2, 3], "scale": 0.5}


def test_failing_pass_leaves_a_note_and_no_matches():
    report = flashfuse.explain(ToyModel(), torch.randn(4, 8),
                               options={"passes": ["relu_mul", "crashing"], "remainder": "eager"})
    assert report.count() == 0
    (note,) = report.notes
    assert "RuntimeError: the crashing test pass always raises" in note
    assert "note      passes skipped" in str(report)


def test_explain_a_compiled_model_explains_the_module():
    model = ToyModel()
    compiled = torch.compile(model, backend="eager")
    report = flashfuse.explain(compiled, torch.randn(4, 8), options=toy.OPTIONS)
    assert report.count("relu_mul") == 1


def test_explain_a_function_with_kwargs():
    def fn(x, *, scale):
        return torch.relu(x) * 2 + scale

    report = flashfuse.explain(fn, torch.randn(5), scale=1.0, options=toy.OPTIONS)
    assert report.count("relu_mul") == 1


# ---- fake=True: nothing computed ----

REAL_RUNS = []


@torch.library.custom_op("flashfuse_explain_test::counted_relu", mutates_args=())
def counted_relu(x: torch.Tensor) -> torch.Tensor:
    REAL_RUNS.append(1)  # only a real (not fake) execution gets here
    return torch.relu(x)


@counted_relu.register_fake
def _(x):
    return torch.empty_like(x)


class CountedModel(ToyModel):
    def forward(self, x):
        return counted_relu(super().forward(x))


def test_fake_explain_computes_nothing_and_reports_the_same():
    model, x = CountedModel(), torch.randn(4, 8)
    REAL_RUNS.clear()
    fake_report = flashfuse.explain(model, x, options=toy.OPTIONS, fake=True)
    assert REAL_RUNS == []
    real_report = flashfuse.explain(model, x, options=toy.OPTIONS)
    assert REAL_RUNS == [1]
    assert str(fake_report) == str(real_report)
    assert fake_report.count("relu_mul") == 1
    assert fake_report.matches[0].source == f"{HERE}:{line_of('@fused-1')}"
    assert _debug_get_cache_entry_list(ToyModel.forward) == []
    assert _debug_get_cache_entry_list(CountedModel.forward) == []


def test_fake_explain_of_the_nanogpt_block_matches_the_real_one():
    model, (x,) = _load_example().make_block()
    fake_report = flashfuse.explain(model, x, fake=True)
    real_report = flashfuse.explain(model, x)
    assert fake_report.count("attention") == 1
    # The same fusions and near-misses at the same places; only the real run can look inside the tril
    # buffer and describe it as causal (fake tensors have no values).
    assert [(m.fusion, m.source) for m in fake_report.matches] == [(m.fusion, m.source) for m in real_report.matches]
    assert [(n.fusion, n.source, n.reason) for n in fake_report.near_misses] == \
        [(n.fusion, n.source, n.reason) for n in real_report.near_misses]
    assert "causal (tril buffer" in real_report.matches[0].description
    assert "float bias/mask (1,1,16,16)" in fake_report.matches[0].description


def test_fake_explain_falls_back_to_real_inputs_when_python_reads_values(caplog):
    def branchy(x):
        y = torch.relu(x) * 2
        if y.sum() > 0:  # a graph break; the Python between the graphs needs a real value
            return y + 1
        return y - 1

    report = flashfuse.explain(branchy, torch.ones(3), options=toy.OPTIONS, fake=True)
    assert report.count("relu_mul") == 1 and len(report.graph_breaks) == 1
    assert any("explaining on the real inputs" in r.getMessage() for r in caplog.records)


# ---- no leftover state ----

class CountingBackend:
    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def test_explain_leaves_no_cache_entries_for_a_later_compile():
    model, x = ToyModel(), torch.randn(4, 8)
    flashfuse.explain(model, x, options=toy.OPTIONS)
    assert _debug_get_cache_entry_list(ToyModel.forward) == []
    counting = CountingBackend()
    with torch._dynamo.config.patch(error_on_recompile=True):  # an explain entry would make this a recompile
        torch.compile(model, backend=counting)(x)
        torch.compile(model, backend=counting)(x)
    assert len(counting.graphs) == 1


def test_explain_keeps_the_users_compiled_code():
    model, x = ToyWithBreak(), torch.randn(3)
    counting = CountingBackend()
    compiled = torch.compile(model, backend=counting)
    compiled(x)
    assert len(counting.graphs) == 2
    flashfuse.explain(model, x, options=toy.OPTIONS)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x)
    assert len(counting.graphs) == 2  # nothing recompiled
    assert len(_debug_get_cache_entry_list(ToyWithBreak.forward)) >= 1


def test_cleanup_without_backend_on_cache_entries(monkeypatch):
    # A torch whose cache entries do not record their backend: explain resets only the code objects
    # that held no compiled code before it ran.
    import types

    from torch._dynamo import eval_frame

    user_model, x = ToyWithBreak(), torch.randn(3)
    counting = CountingBackend()
    torch.compile(user_model, backend=counting)(x)
    real_list = eval_frame._debug_get_cache_entry_list
    monkeypatch.setattr(eval_frame, "_debug_get_cache_entry_list",
                        lambda code: [types.SimpleNamespace() for _ in real_list(code)])
    flashfuse.explain(ToyModel(), torch.randn(4, 8), options=toy.OPTIONS)
    monkeypatch.undo()
    assert real_list(ToyModel.forward) == []
    assert len(real_list(ToyWithBreak.forward)) == 1


def test_explain_does_not_teach_dynamo_dynamic_shapes():
    # Dynamo marks a size dynamic when it changes between compiles of a frame; explain's compile must
    # not count, or the user's first compile at another size would be dynamic.
    model = ToyModel()
    flashfuse.explain(model, torch.randn(4, 8), options=toy.OPTIONS)
    counting = CountingBackend()
    torch.compile(model, backend=counting)(torch.randn(6, 8))
    (gm,) = counting.graphs
    sizes = [n.meta["example_value"].shape for n in gm.graph.nodes if n.op == "placeholder"
             and isinstance(n.meta.get("example_value"), torch.Tensor)]
    assert torch.Size([6, 8]) in sizes
    assert all(isinstance(d, int) for s in sizes for d in s)


def test_explain_restores_buffers_and_rng():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    model.train()
    mean_before = model[1].running_mean.clone()
    x = torch.randn(4, 8) + 5
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    flashfuse.explain(model, x, options=toy.OPTIONS)
    assert torch.equal(model[1].running_mean, mean_before)
    assert model[1].num_batches_tracked.item() == 0
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_explain_restores_inputs_written_in_place():
    def writes_its_input(x):
        x.mul_(3)
        return torch.relu(x) * 2

    x = torch.ones(4)
    report = flashfuse.explain(writes_its_input, x, options=toy.OPTIONS)
    assert report.count("relu_mul") == 1
    assert torch.equal(x, torch.ones(4))


def test_explain_does_not_touch_tensors_it_did_not_change():
    # A tensor saved for backward must keep its version, or the user's backward fails afterwards.
    model, x = ToyModel(), torch.randn(4, 8, requires_grad=True)
    model.register_buffer("offset", torch.zeros(8))
    loss = (model(x) * x).sum()  # x is saved for the backward of the product
    versions = (x._version, model.offset._version)
    flashfuse.explain(model, x, options=toy.OPTIONS)
    assert (x._version, model.offset._version) == versions
    loss.backward()


# ---- drawing ----

def test_draw_dot_shows_rewritten_region(tmp_path):
    pytest.importorskip("pydot")
    report = flashfuse.explain(ToyModel(), torch.randn(4, 8), options=toy.OPTIONS)
    path = report.draw(tmp_path / "toy.dot")
    text = open(path).read()
    assert text.startswith("digraph")
    assert '"g0a_relu_times_two_default"' in text  # added by the pass, drawn in "after"
    assert '"g0b_relu"' in text and '"g0b_mul"' in text  # replaced by the pass, drawn in "before"
    assert "fillcolor=mistyrose" in text and "fillcolor=palegreen" in text


@pytest.mark.parametrize("ext", ["svg", "png"])
def test_draw_picture(tmp_path, ext):
    pytest.importorskip("pydot")
    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot program is not installed")
    report = flashfuse.explain(ToyModel(), torch.randn(4, 8), options=toy.OPTIONS)
    path = report.draw(str(tmp_path / f"toy.{ext}"))
    data = open(path, "rb").read()
    assert data.startswith(b"\x89PNG") if ext == "png" else b"<svg" in data
    if ext == "svg":
        assert b"relu_times_two" in data


def test_draw_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"\.svg"):
        Report().draw(tmp_path / "x.jpeg")


def test_draw_without_pydot_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydot", None)  # makes `import pydot` raise ImportError
    with pytest.raises(ImportError, match="pip install pydot"):
        Report().draw(tmp_path / "x.svg")


def test_draw_without_graphviz_says_so(tmp_path, monkeypatch):
    pytest.importorskip("pydot")
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` on the PATH
    with pytest.raises(ImportError, match="needs graphviz's `dot` program"):
        Report().draw(tmp_path / "x.svg")


# ---- with the real attention pass ----

def _load_example():
    spec = importlib.util.spec_from_file_location("explain_toy_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nanogpt_attention_is_explained_with_its_source_and_specialization():
    example = _load_example()
    model, (x,) = example.make_block()
    report = flashfuse.explain(model, x, options={"passes": ["attention"]})
    assert report.count("attention") == 1, str(report)
    (match,) = report.matches
    path, line = match.source.rsplit(":", 1)
    assert os.path.samefile(path, EXAMPLE)
    lines, first = inspect.getsourcelines(example.CausalSelfAttention.forward)
    assert first <= int(line) < first + len(lines)  # a line of the user's attention code
    assert "p=0.1" in match.description  # the block is in training mode: dropout is part of the fusion
    assert match.module == "attn"  # the submodule it was found in
    assert f"attention at explain_toy.py:{line} in attn: " in str(report)
    data = json.loads(json.dumps(report.to_dict()))  # the real pass's details (sympy, dtypes) serialise
    assert data["matches"][0]["description"] == match.description
    assert data["counts"] == {"attention": 1}


def test_attention_near_miss_reason_is_reported():
    def softmax_over_queries(q, k, v):
        att = torch.softmax(q @ k.transpose(-2, -1), dim=-2)  # @attention-near-miss
        return att @ v

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    report = flashfuse.explain(softmax_over_queries, q, k, v, options={"passes": ["attention"]})
    assert report.count("attention") == 0
    misses = [n for n in report.near_misses if n.fusion == "attention"]
    assert misses, str(report)
    assert all(n.reason for n in misses)
    assert any(n.source == f"{HERE}:{line_of('@attention-near-miss')}" for n in misses), str(report)


@pytest.mark.parametrize("stack_entry,module", [
    ("L['self'].transformer.h.1.attn", "transformer.h.1.attn"),
    ("L['self']", ""),
    ("L['self']._modules['h']._modules['0'].attn", "h.0.attn"),
    ("L['self'].h[0].attn", "h.0.attn"),
])
def test_module_path_from_nn_module_stack(stack_entry, module):
    from flashfuse.report import module_of

    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    node.meta["nn_module_stack"] = {"outer": ("L['self']", nn.Module), "inner": (stack_entry, nn.Linear)}
    assert module_of(node) == module
