"""The Circuits page on odd but possible inputs, driven headless with AppTest on zoo:qwen3-moe: a circuit of one edge,
files that are no circuit (one error line), optional parts a file may lack or hold oddly (NaN scores, metrics that are
no table), and the discovery tab's prompt / answer / top-edges boxes."""

import json
import math

import pytest
from streamlit.testing.v1 import AppTest

from helpers import UI_MODEL, ui_app, ui_discover, ui_ok, ui_one_error

pytestmark = pytest.mark.usefixtures("ui_model_argv")


def _node(name: str, layer: int, **attrs) -> dict:
    return {"id": name, "kind": "head", "layer": layer, "index": 0, **attrs}


def _edge(source: str, target: str, score: float = 1.0) -> dict:
    return {"source": source, "target": target, "port": "in", "score": score}


def _upload(at: AppTest, name: str, data: dict) -> AppTest:
    at.file_uploader(key="circuit_upload").set_value((name, json.dumps(data).encode(), "application/json")).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_circuit_of_one_edge_is_drawn_without_a_slider():
    one = {"nodes": [_node("a", 0), _node("b", 1)], "edges": [_edge("a", "b", 0.5)]}
    at = _upload(ui_app("Circuits"), "one.json", one)
    ui_ok(at)
    assert len(at.get("plotly_chart")) == 1 and not at.slider
    assert "1 scored edge" in [c.value for c in at.caption]
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 1


THREE = [_edge("a", "b", 1.0), _edge("b", "c", -2.0)]


@pytest.mark.parametrize("nodes,needle", [
    ([{"id": "a"}, {"id": "b"}, {"id": "c"}], "node 0 (a) has no 'kind'"),
    ([_node("a", 0), {"id": "b", "kind": "mlp", "index": 0}, _node("c", 2)], "node 1 (b) has no 'layer'"),
    ([_node("a", 0), _node("b", 1), {"id": "c", "kind": "logits", "layer": 2}], "node 2 (c) has no 'index'"),
    ([_node("a", "zero"), _node("b", 1), _node("c", 2)], "node 0 (a) has layer 'zero', not an integer"),
    ([_node("a", 0), _node("b", 1, kind="blob"), _node("c", 2)], "node 1 (b) has kind 'blob'; kinds: input, "),
])
def test_a_node_without_what_every_circuit_node_has_is_one_error_line(nodes, needle):
    """``workbench circuit`` gives every node a kind, an integer layer and an integer index; the drawing places nodes
    by them, so a file without them is refused when it is read, naming the file and the first bad node."""
    at = _upload(ui_app("Circuits"), "bad.json", {"nodes": nodes, "edges": THREE})
    ui_one_error(at, "bad.json: not a circuit", needle)
    assert "circuit" not in at.session_state and not at.get("plotly_chart")


def test_edges_without_a_finite_score_are_left_out_of_the_drawing_with_a_warning():
    nodes = [_node("a", 0), _node("b", 1), _node("c", 2)]
    at = _upload(ui_app("Circuits"), "nan.json", {"nodes": nodes, "edges": [*THREE, _edge("a", "c", math.nan)]})
    ui_ok(at)
    assert [w.value for w in at.warning] == ["1 of the 3 scored edges has no finite score (NaN or infinite): not "
                                             "drawn or listed (the JSON / GraphML / DOT downloads carry them)"]
    assert at.slider(key="circuit_edges").max == 2 and len(at.get("plotly_chart")) == 1
    assert sorted(at.dataframe[0].value.score) == [-2.0, 1.0]
    assert at.session_state["circuit"].n_edges == 3  # the circuit as read: the JSON download carries all three
    only_nan = {"nodes": nodes[:2], "edges": [_edge("a", "b", math.nan)]}
    at = _upload(at, "only_nan.json", only_nan)
    ui_ok(at)
    assert [w.value for w in at.warning] == ["none of the 1 scored edges has a finite score (NaN or infinite): "
                                             "nothing to draw"]
    assert not at.get("plotly_chart")


@pytest.mark.parametrize("metrics", [[0.9, 0.5], "faithful", 3])
def test_metrics_that_are_no_table_are_shown_as_they_are(metrics):
    data = {"nodes": [_node("a", 0), _node("b", 1), _node("c", 2)], "edges": THREE,
            "graph": {"meta": {"model": UI_MODEL, "metrics": metrics}}}
    at = _upload(ui_app("Circuits"), "m.json", data)
    ui_ok(at)
    assert len(at.get("plotly_chart")) == 1
    if isinstance(metrics, list):
        assert at.json and json.loads(at.json[0].value) == {"metrics": metrics}
    else:
        assert [(m.label, m.value) for m in at.metric] == [("metrics", str(metrics))]


# ----- discovery ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,answer,needle", [
    ("", " Paris", "type the prompt, or clear the answer to run the built-in facts"),
    ("   ", " Paris", "type the prompt, or clear the answer to run the built-in facts"),
    ("The capital of France is", " ", "a typed fact needs its answer"),
])
def test_a_half_typed_fact_is_an_error_not_another_run(prompt, answer, needle):
    """A typed answer with no prompt used to run the built-in facts (the answer ignored), and a blank answer passed;
    both are one error line, and nothing runs."""
    at = ui_app("Circuits")
    at.text_input(key="circuit_fact_prompt").input(prompt)
    at.text_input(key="circuit_fact_answer").input(answer)
    at.button(key="circuit_run").click().run()
    assert not at.exception
    ui_one_error(at, needle)
    assert "circuit" not in at.session_state


def test_a_circuit_that_pruning_empties_says_why():
    """One top edge: no path from the input to the logits fits, and pruning drops what is off such paths, so the
    circuit is empty; the page says so instead of only "the circuit has no scored edges"."""
    at = ui_discover(1, 1)
    assert at.session_state["circuit"].n_edges == 0
    msg = at.warning[0].value
    assert msg.startswith("the circuit has no scored edges: a circuit keeps only edges on a path from the input to "
                          "the logits") and "within the top 1 edges (fill selection)" in msg, msg
    assert msg.endswith("raise top edges")


def _clear(at: AppTest) -> None:
    at.file_uploader(key="circuit_upload").set_value(None).run()


def test_an_upload_is_taken_by_its_content_and_again_after_clearing():
    """The page once told uploads apart by name and size: an edited file of the same size was not read, and the same
    file uploaded again after clearing did not replace a circuit discovered meanwhile."""
    nodes = [_node("a", 0), _node("b", 1), _node("c", 2)]
    at = _upload(ui_discover(1, 50), "c.json", {"nodes": nodes, "edges": THREE})
    assert at.session_state["circuit"].n_edges == 2
    edited = [_edge("a", "b", 3.0), _edge("b", "c", -2.0)]  # "3.0" for "1.0": same name, same size
    _upload(at, "c.json", {"nodes": nodes, "edges": edited})
    assert [e["score"] for e in at.session_state["circuit"].edges] == [3.0, -2.0]
    at.button(key="circuit_run").click().run()  # a discovery replaces it while the file sits in the uploader
    ui_ok(at)
    discovered = at.session_state["circuit"]
    at.run()
    assert at.session_state["circuit"] is discovered
    _clear(at)
    _upload(at, "c.json", {"nodes": nodes, "edges": edited})  # the same file again: shown again
    assert [e["score"] for e in at.session_state["circuit"].edges] == [3.0, -2.0]


def test_a_bad_upload_errs_on_each_rerun_and_keeps_the_last_good_circuit():
    nodes = [_node("a", 0), _node("b", 1), _node("c", 2)]
    at = _upload(ui_app("Circuits"), "good.json", {"nodes": nodes, "edges": THREE})
    at.file_uploader(key="circuit_upload").set_value(("bad.json", b'{"nodes": [', "application/json")).run()
    for _ in range(2):
        ui_one_error(at, "bad.json line 1: not valid JSON")
        assert at.session_state["circuit"].n_edges == 2
        at.run()
