"""The Streamlit app, driven headless with AppTest on the tiny zoo:qwen3-moe model."""

import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from streamlit.testing.v1 import AppTest

import workbench as wb
from helpers import APP, UI_MODEL, ui_app, ui_discover, ui_edit, ui_ok
from workbench.circuits.export import Circuit, write_json
from workbench.errors import WorkbenchError
from workbench.interventions import parse
from workbench.studies import Study

# dropping half the experts of layer 0 re-routes every token: the greedy continuation changes (checked)
DROP = {i: {"drop": True} for i in range(4)}


pytestmark = pytest.mark.usefixtures("ui_model_argv")


def test_ui_package_import_is_light():
    import subprocess
    import sys

    code = "import sys, workbench.ui; print('streamlit' in sys.modules, 'plotly' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_steer_toggle_changes_generation_and_study_round_trips():
    at = ui_app("Steer")
    assert at.text_area(key="steer_prompt").value
    assert at.selectbox(key="steer_layer").options == ["0", "1", "2", "3"]
    assert len(at.data_editor) == 1
    base, same = at.session_state["steer_generations"]
    assert base == same
    start = time.perf_counter()
    ui_edit(at, 0, DROP)
    latency = time.perf_counter() - start
    ui_ok(at)
    print(f"toggle -> 20-token generation: {latency:.2f} s")
    base2, steered = at.session_state["steer_generations"]
    assert base2 == base and steered != base
    shown = [c.value for c in at.code]
    assert any(steered in s for s in shown) and any(base in s for s in shown)
    assert len(at.get("download_button")) == 1
    labels = {m.label: m for m in at.metric}
    assert {"attention share on position 0", "max |residual|"} <= set(labels)
    assert float(labels["KL from baseline (mean over positions)"].value) > 0

    # the downloadable study is what `workbench ablate` reads, and validates against the model
    text = at.session_state["steer_study_yaml"]
    spec = yaml.safe_load(text)
    study = Study(spec, "ui_study.yaml")
    ivs = study.explicit[0].interventions
    assert [(iv.op, iv.layers, iv.expert) for iv in ivs] == [("drop", (0,), e) for e in range(4)]
    lm = wb.load(UI_MODEL)
    for iv in ivs:
        iv.validate(lm)

    # uploading it into a fresh app restores the table and the steered generation
    fresh = ui_app("Steer")
    assert fresh.session_state["steer_generations"][1] == base
    fresh.file_uploader(key="steer_upload").set_value(("ui_study.yaml", text.encode(), "application/x-yaml"))
    fresh.run()
    fresh.run()  # the table is rebuilt from the upload on the run after it
    ui_ok(fresh)
    assert list(fresh.session_state["steer_tables"][0]["drop"]) == [True] * 4 + [False] * 4
    assert fresh.session_state["steer_generations"][1] == steered


def test_steer_scale_bias_force_build_valid_interventions():
    at = ui_app("Steer")
    at.selectbox(key="steer_layer").set_value(1).run()
    ui_edit(at, 1, {2: {"zero": True, "scale": 0.5}, 5: {"force": True, "force_weight": 0.4, "bias": 2.0}})
    ui_ok(at)
    spec = yaml.safe_load(at.session_state["steer_study_yaml"])
    ivs = parse(spec["conditions"][0]["interventions"])
    assert {(iv.op, iv.expert) for iv in ivs} == {("zero", 2), ("scale", 2), ("force", 5), ("bias", 5)}
    assert next(iv for iv in ivs if iv.op == "force").weight == pytest.approx(0.4)
    # edits of a layer survive showing another layer
    at.selectbox(key="steer_layer").set_value(0).run()
    ui_edit(at, 0, {1: {"zero": True}})
    ui_ok(at)
    ivs = parse(yaml.safe_load(at.session_state["steer_study_yaml"])["conditions"][0]["interventions"])
    assert {(iv.op, iv.layers[0], iv.expert) for iv in ivs} == {("zero", 0, 1), ("zero", 1, 2), ("scale", 1, 2),
                                                               ("force", 1, 5), ("bias", 1, 5)}


def test_steer_scoped_ops_reach_the_study_and_round_trip(tmp_path):
    at = ui_app("Steer")
    ui_edit(at, 0, {1: {"zero": True, "positions": "0, -1"}, 3: {"drop": True, "token": " capital"},
                  5: {"scale": 0.5, "positions": "2", "token": "France"}})
    ui_ok(at)
    path = tmp_path / "ui_study.yaml"
    path.write_text(at.session_state["steer_study_yaml"])
    study = Study.from_file(path)  # what `workbench ablate UI_MODEL --study ui_study.yaml` reads
    conditions = study.resolve(wb.load(UI_MODEL))  # and validates against the model before any run
    assert [c.name for c in conditions] == ["baseline", "ui"]
    got = {(iv.op, iv.expert): (iv.positions, iv.token) for iv in conditions[1].interventions}
    assert got == {("zero", 1): ((0, -1), None), ("drop", 3): (None, " capital"), ("scale", 5): ((2,), "France")}
    assert any("zero L0.E1 @0,-1" in c.value for c in at.caption)
    steered = at.session_state["steer_generations"][1]

    # the scopes come back into the table from the uploaded file
    fresh = ui_app("Steer")
    fresh.file_uploader(key="steer_upload").set_value(("ui_study.yaml", path.read_bytes(), "application/x-yaml"))
    fresh.run()
    fresh.run()
    ui_ok(fresh)
    table = fresh.session_state["steer_tables"][0]
    assert list(table.loc[[1, 3, 5], "positions"]) == ["0, -1", "", "2"]
    assert list(table.loc[[1, 3, 5], "token"]) == ["", " capital", "France"]
    assert fresh.session_state["steer_generations"][1] == steered

    # a malformed positions cell is a message, not a crash
    ui_edit(at, 0, {1: {"zero": True, "positions": "first"}})
    assert not at.exception
    assert any("positions 'first'" in e.value for e in at.error)


def test_bad_model_path_shows_error_and_app_keeps_running():
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.sidebar.selectbox(key="model_choice").set_value("(local path or hub id)").run()
    at.sidebar.text_input(key="model_path").input("/nonexistent/model-dir").run()
    assert not at.exception
    assert any("does not exist" in e.value for e in at.error)
    at.sidebar.selectbox(key="model_choice").set_value(UI_MODEL).run()
    ui_ok(at)


def test_model_from_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["app.py", "--model", "zoo:olmoe"])
    at = AppTest.from_file(APP, default_timeout=60).run()
    ui_ok(at)
    assert at.sidebar.selectbox(key="model_choice").value == "zoo:olmoe"
    monkeypatch.setattr(sys, "argv", ["app.py", "--model", "./no/such/checkpoint"])
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert at.sidebar.text_input(key="model_path").value == "./no/such/checkpoint"
    assert any("does not exist" in e.value for e in at.error)


def test_profile_page_runs_and_plots(tmp_path):
    at = ui_app("Profile")
    assert at.text_area(key="profile_prompts").value
    at.number_input(key="profile_max_tokens").set_value(16)
    at.text_area(key="profile_prompts").input("The capital of France is Paris.\nWater boils at 100 degrees.")
    at.button(key="profile_run").click().run()
    ui_ok(at)
    p = at.session_state["profile"]
    assert p["meta"]["num_prompts"] == 2
    charts = at.get("plotly_chart")
    # expert max, router load, co-activation, local consistency, vocabulary, massive, sinks, and the Q/K/V norms
    # (concentration by layer, one heatmap per projection)
    assert len(charts) == 11
    assert {"profile_fig_qk_concentration", "profile_fig_qk_norms_q", "profile_fig_qk_norms_k",
            "profile_fig_qk_norms_v"} <= {c.key for c in charts}
    at.button(key="profile_report").click().run()  # the same report page `workbench profile` writes
    ui_ok(at)
    page = at.session_state["profile_report_html"][1].decode()
    assert page.startswith("<!doctype html>") and "<h2>Findings</h2>" in page and "data:image/png;base64," in page
    assert len(at.dataframe) >= 2  # super-expert candidates, router statistics
    # a random model: no super expert, and the table says why each of the largest candidates is not one
    assert p["super_experts"] == [] and any(i.value.startswith("no super experts (largest") for i in at.info)
    cands = next(d.value for d in at.dataframe if "why" in d.value.columns)
    assert (cands["super expert"] == "no").all() and cands.why.str.startswith("rejected").all()
    top = max((e for e in p["experts"] if e["candidate"]), key=lambda e: e["max_abs"])
    at.selectbox(key="profile_pick_layer").set_value(top["layer"]).run()
    at.selectbox(key="profile_pick_expert").set_value(top["expert"]).run()
    details = dict(next(d.value for d in at.dataframe if list(d.value.columns) == ["", "value"]).itertuples(index=False))
    assert details["super expert"] == "no" and details["super-expert check"].startswith("rejected")

    # picking an expert (what a click on the heatmap does) shows its details; the button ticks it for steering
    at.selectbox(key="profile_pick_layer").set_value(1).run()
    at.selectbox(key="profile_pick_expert").set_value(2).run()
    ui_ok(at)
    table = next(d.value for d in at.dataframe if list(d.value.columns) == ["", "value"])  # dataframes have no key here
    details = dict(table.itertuples(index=False))
    e = next(e for e in p["experts"] if (e["layer"], e["expert"]) == (1, 2))
    assert details["channel"] == str(e["channel"]) and details["position"] == str(e["position"])
    assert float(details["load"]) == pytest.approx(p["router"][1]["load"][2], rel=1e-3)
    assert "kurtosis of its channel maxima" in details
    at.selectbox(key="profile_pick_op").set_value("drop")
    at.button(key="profile_pick_add").click().run()
    ui_ok(at)
    assert bool(at.session_state["steer_tables"][1].loc[2, "drop"])

    # the steer table then shows each expert's load and max|out| from this profile
    at.sidebar.radio(key="page").set_value("Steer").run()
    ui_ok(at)
    table = at.data_editor[0].value
    assert {"load", "max_abs"} <= set(table.columns)
    assert table["load"].sum() == pytest.approx(1.0)
    assert at.selectbox(key="steer_layer").value == 1  # the layer of the expert added on the Profile page
    assert list(at.data_editor[0].value["drop"]) == [False, False, True] + [False] * 5  # from the Profile page
    ivs = parse(yaml.safe_load(at.session_state["steer_study_yaml"])["conditions"][0]["interventions"])
    assert [(iv.op, iv.layers, iv.expert) for iv in ivs] == [("drop", (1,), 2)]
    at.sidebar.radio(key="page").set_value("Profile").run()

    # a saved profile.json opens by path and by upload
    saved = tmp_path / "profile.json"
    saved.write_text(json.dumps(p))
    fresh = ui_app("Profile")
    fresh.text_input(key="profile_path").input(str(tmp_path)).run()
    fresh.button(key="profile_open").click().run()
    ui_ok(fresh)
    assert fresh.session_state["profile"]["meta"]["num_prompts"] == 2 and len(fresh.get("plotly_chart")) == 11
    fresh = ui_app("Profile")
    fresh.file_uploader(key="profile_upload").set_value(("profile.json", saved.read_bytes(), "application/json"))
    fresh.run()
    ui_ok(fresh)
    assert len(fresh.get("plotly_chart")) == 11

    at.text_input(key="profile_path").input(str(tmp_path / "missing.json")).run()
    at.button(key="profile_open").click().run()
    assert not at.exception
    assert any("does not exist" in e.value for e in at.error)


def _circuit(path: Path) -> Path:
    nodes = {"input": {"kind": "input", "layer": -1, "index": 0, "head": -1, "expert": -1},
             "a0.h0": {"kind": "head", "layer": 0, "index": 0, "head": 0, "expert": -1},
             "m0.router": {"kind": "router", "layer": 0, "index": 0, "head": -1, "expert": -1},
             "m0.e3": {"kind": "expert", "layer": 0, "index": 3, "head": -1, "expert": 3},
             "logits": {"kind": "logits", "layer": 1, "index": 0, "head": -1, "expert": -1}}
    edges = [{"source": "input", "target": "a0.h0", "port": "q", "score": 0.5},
             {"source": "input", "target": "m0.router", "port": "in", "score": -0.2},
             {"source": "a0.h0", "target": "m0.e3", "port": "in", "score": 1.5},
             {"source": "m0.e3", "target": "logits", "port": "in", "score": 2.0},
             {"source": "m0.router", "target": "m0.e3", "port": "internal", "score": 0.0}]
    meta = {"model": UI_MODEL, "method": "eap-ig", "metrics": {"faithfulness": 0.91, "hit_at_10": 0.8}}
    return write_json(Circuit(nodes, edges, meta), path / "circuit.json")


def test_the_workbench_warnings_reach_the_page():
    """Prompts cut to the page's "max tokens per prompt" were profiled cut without a word on the page: the
    workbench's warning went to the console. It is on the page now, once, above the profile; a library's warning
    is not (it stays in the console)."""
    at = ui_app("Profile")
    at.number_input(key="profile_max_tokens").set_value(3)
    at.text_area(key="profile_prompts").input("The capital of France is Paris.\nWater boils at 100 degrees.\nHi")
    at.button(key="profile_run").click().run()
    ui_ok(at)
    assert at.session_state["profile"]["meta"]["num_tokens"] <= 9
    said = [w.value for w in at.warning if "truncated" in w.value]
    assert said == ["2 prompt(s) longer than 3 tokens were truncated"], [w.value for w in at.warning]
    import warnings

    import streamlit as st

    from workbench.ui.common import warnings_on_page

    shown = []
    with warnings.catch_warnings(record=True) as console:
        warnings.simplefilter("always")
        st_warning, st.warning = st.warning, shown.append
        try:
            with warnings_on_page():
                warnings.warn("a library's own warning", UserWarning)  # from this file: not the workbench's
        finally:
            st.warning = st_warning
    assert shown == [] and [str(w.message) for w in console] == ["a library's own warning"]


def test_circuits_page_draws_graph_and_metrics(tmp_path):
    from workbench.ui.circuits_page import svg_download

    at = ui_app("Circuits")
    at.text_input(key="circuit_path").input(str(tmp_path / "nope.json")).run()
    assert not at.exception and any("does not exist" in e.value for e in at.error)
    at.text_input(key="circuit_path").input(str(_circuit(tmp_path))).run()
    ui_ok(at)
    assert at.slider(key="circuit_edges").value == 4
    assert len(at.get("plotly_chart")) == 1
    assert {m.label for m in at.metric} == {"faithfulness", "hit_at_10"}
    at.slider(key="circuit_edges").set_value(2).run()
    ui_ok(at)
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 2
    assert len(at.get("download_button")) == 4  # JSON, GraphML, DOT, SVG
    svg = svg_download(at.session_state["circuit"], 2)()  # what the SVG button sends when clicked
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    assert 'id="edge-1"' in svg and 'id="edge-2"' not in svg and 'id="node-input"' not in svg  # 2 strongest edges
    assert not at.warning and not [i.value for i in at.info if "This circuit is of" in i.value]
    meta = json.loads((tmp_path / "circuit.json").read_text())
    meta["graph"]["meta"]["model"] = "zoo:olmoe"  # another model's circuit (or one kept after a model switch): said
    (tmp_path / "other.json").write_text(json.dumps(meta))
    at.text_input(key="circuit_path").input(str(tmp_path / "other.json")).run()
    ui_ok(at)
    assert [i.value for i in at.info if i.value.startswith(f"This circuit is of zoo:olmoe; the sidebar's model is "
                                                             f"{UI_MODEL}.")]
    # a noisy gap is said beside the figures, as `workbench circuit` and the report say it (the page showed
    # "faithfulness 0.998" for one fact of granitemoeshared whose clean and corrupted metrics differed by 2e-4)
    for gz, says in ((0.6, "(gap_z 0.60)"), (float("nan"), "gives no spread"), (25.0, None)):
        data = json.loads((tmp_path / "circuit.json").read_text())
        data["graph"]["meta"]["metrics"]["gap_z"] = gz
        (tmp_path / f"c{gz}.json").write_text(json.dumps(data))
        at.text_input(key="circuit_path").input(str(tmp_path / f"c{gz}.json")).run()
        ui_ok(at)
        noise = [w.value for w in at.warning if "The faithfulness figures are noise here" in w.value]
        assert (noise and says in noise[0]) if says else not noise, noise


def test_circuits_page_shows_a_circuit_with_no_model_loaded(tmp_path):
    """With the path box left empty (no model) the page that needs none failed on an opened circuit: "internal
    error (AttributeError: 'NoneType' object has no attribute 'spec')"."""
    at = ui_app("Circuits")
    at.sidebar.selectbox(key="model_choice").set_value("(local path or hub id)").run()
    assert not at.exception
    at.text_input(key="circuit_path").input(str(_circuit(tmp_path))).run()
    assert not at.exception and not [e.value for e in at.error if "internal error" in e.value]
    assert len(at.get("plotly_chart")) == 1
    assert [i.value for i in at.info if "the sidebar's model is none" in i.value]


def test_heatmap_click_points_pick_an_expert():
    from workbench.ui.profile_page import picked_expert

    # the selection Streamlit reports for a click on the invisible marker of cell (layer 1, expert 2)
    click = {"curve_number": 1, "point_number": 10, "point_index": 10, "x": 2, "y": 1, "customdata": 0.3}
    assert picked_expert([click]) == (1, 2)
    assert picked_expert([{**click, "y": "3"}, {"x": 5, "y": "0"}]) == (0, 5)  # categorical y, last click wins
    assert picked_expert([]) is None and picked_expert(None) is None


def test_circuits_page_runs_discovery():
    at = ui_discover(4, 30)
    circuit = at.session_state["circuit"]
    assert circuit.meta["metrics"]["n_facts"] == 4 and circuit.n_edges > 0
    assert at.slider(key="circuit_edges").value == min(circuit.n_edges, 100)
    assert "faithfulness" in {m.label for m in at.metric}
    assert len(at.get("plotly_chart")) == 1


def test_cli_ui_command():
    from workbench.ui.cli import APP as CLI_APP
    from workbench.ui.cli import add_ui_parser, command

    p = argparse.ArgumentParser()
    add_ui_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["ui", "--model", UI_MODEL, "--port", "8765", "--threads", "1"])
    cmd = command(args.model, args.port, args.threads)
    assert Path(CLI_APP) == Path(APP)
    assert cmd[1:4] == ["-m", "streamlit", "run"]
    for flag, value in [("--server.headless", "true"), ("--server.address", "127.0.0.1"),
                        ("--server.port", "8765"), ("--browser.gatherUsageStats", "false")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[-5:] == ["--", "--model", UI_MODEL, "--threads", "1"]
    assert command(None, 8501)[-1] == "false"  # no app arguments, no "--"


def test_default_model_shows_its_super_expert_in_steer(monkeypatch):
    """Started without --model, the app opens zoo:tiny-moe-se; zeroing its super expert (L1.E5) in Steer
    changes the continuation of the default prompt (" Paris." -> " France.")."""
    monkeypatch.setattr(sys, "argv", ["app.py"])
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert at.sidebar.selectbox(key="model_choice").value == "zoo:tiny-moe-se"
    at.sidebar.radio(key="page").set_value("Steer").run()
    assert at.session_state["steer_generations"] == (" Paris.<|im_end|>", " Paris.<|im_end|>")
    at.selectbox(key="steer_layer").set_value("1").run()
    ui_edit(at, 1, {5: {"zero": True}})
    ui_ok(at)
    assert at.session_state["steer_generations"] == (" Paris.<|im_end|>", " France.<|im_end|>")


def test_steer_yaml_box_steers_a_dense_model_and_round_trips(tmp_path, monkeypatch, zoo_tokenizer):
    """A dense model has no expert table; heads, Q/K dims and channels are steered from the YAML box, a bad
    entry is one error line, and the study it writes loads back into the box."""
    from workbench.models.families import save_tiny

    folder = save_tiny("llama", tmp_path / "llama", zoo_tokenizer)
    monkeypatch.setattr(sys, "argv", ["app.py", "--model", str(folder)])
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.sidebar.radio(key="page").set_value("Steer").run()
    ui_ok(at)
    assert any("no MoE layers" in i.value for i in at.info)
    assert [e.key for e in at.data_editor] == [f"steer_dense_{at.session_state['steer_version']}"]
    assert at.data_editor[0].value.empty  # no profile of this model yet: nothing pre-filled
    base, same = at.session_state["steer_generations"]
    assert base == same
    box = "- {op: zero_head, layers: [0, 1, 2, 3], heads: [0, 1, 2, 3]}\n- {op: mean_qk, layers: 1, top: 2}\n"
    at.text_area(key="steer_extra").input(box).run()
    ui_ok(at)
    assert at.session_state["steer_generations"][1] != base
    ivs = parse(yaml.safe_load(at.session_state["steer_study_yaml"])["conditions"][0]["interventions"])
    assert [iv.op for iv in ivs] == ["zero_head", "mean_qk"] and ivs[1].top == 2
    steered = at.session_state["steer_generations"][1]
    text = at.session_state["steer_study_yaml"]
    at.text_area(key="steer_extra").input("- {op: zero_head, layers: 0, heads: [9]}").run()
    assert not at.exception and any("head 9 out of range" in e.value for e in at.error)
    fresh = AppTest.from_file(APP, default_timeout=60).run()
    fresh.sidebar.radio(key="page").set_value("Steer").run()
    fresh.file_uploader(key="steer_upload").set_value(("ui_study.yaml", text.encode(), "application/x-yaml"))
    fresh.run()
    ui_ok(fresh)
    assert [iv.op for iv in parse(yaml.safe_load(fresh.text_area(key="steer_extra").value))] == ["zero_head", "mean_qk"]
    assert fresh.session_state["steer_generations"][1] == steered


def test_dense_table_edits_and_the_text_boxes_hold(tmp_path, monkeypatch, zoo_tokenizer):
    """The dense table was fed its own output, and a "dynamic" editor then dropped every second edit: a row ticked
    then unticked stayed on (in headless Chromium too). Visiting another page emptied the prompt and the YAML box
    (Streamlit drops a widget's state on a run that does not draw it). The Profile page printed "L0 nan, L1 nan"."""
    from workbench.models.families import save_tiny

    folder = save_tiny("gemma2", tmp_path / "gemma2", zoo_tokenizer)
    monkeypatch.setattr(sys, "argv", ["app.py", "--model", str(folder)])
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.number_input(key="profile_max_tokens").set_value(16)
    at.button(key="profile_run").click().run()
    ui_ok(at)  # a dense model's layers have no kurtosis of expert maxima: not printed as "L0 nan, L1 nan ..."
    assert not [c.value for c in at.caption if "nan" in c.value.split()], [c.value for c in at.caption]
    at.sidebar.radio(key="page").set_value("Steer").run()
    ui_ok(at)

    def active():
        return [c.value for c in at.caption if c.value[:1].isdigit() and " active intervention" in c.value]

    def tick(rows):
        at.session_state[at.data_editor[0].key] = {"edited_rows": rows, "added_rows": [], "deleted_rows": []}
        at.run()
        ui_ok(at)
        return active()
    first = tick({0: {"on": True}})
    assert first and first[0].startswith("1 active intervention: ")
    assert tick({0: {"on": False}}) == []  # (stayed "1 active intervention")
    assert tick({1: {"on": True}})[0].startswith("1 active intervention: ")
    at.text_area(key="steer_prompt").input("Water boils at").run()
    at.text_area(key="steer_extra").input("- {op: zero_head, layers: 0, heads: [1]}").run()
    ui_ok(at)
    both = active()
    assert both[0].startswith("2 active interventions: ")
    at.sidebar.radio(key="page").set_value("Profile").run()
    at.sidebar.radio(key="page").set_value("Steer").run()
    ui_ok(at)
    assert at.text_area(key="steer_prompt").value == "Water boils at"
    assert at.text_area(key="steer_extra").value == "- {op: zero_head, layers: 0, heads: [1]}"
    assert active() == both


@pytest.mark.slow
def test_dense_steer_table_from_smollm2s_profile(monkeypatch):
    """On SmolLM2, the profile fills the Steer page's dense table with its massive-activation channel and sink
    heads; ticking channel 507 (zeroed from layer 11 on) changes the greedy continuation."""
    monkeypatch.setattr(sys, "argv", ["app.py", "--model", "smollm2-135m"])
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.sidebar.radio(key="page").set_value("Profile").run()
    at.number_input(key="profile_max_tokens").set_value(16)
    at.text_area(key="profile_prompts").input("The capital of France is Paris.\nWater boils at 100 degrees.")
    at.button(key="profile_run").click().run()
    ui_ok(at)
    at.sidebar.radio(key="page").set_value("Steer").run()
    ui_ok(at)
    table = at.data_editor[0].value
    massive = table[table.op == "zero_channel"]
    assert massive["index"].tolist()[:1] == [507] and int(massive["layer"].iloc[0]) == 11
    assert (table.op == "zero_head").sum() == 3 and not table.on.any()
    base, same = at.session_state["steer_generations"]
    assert base == same
    row = int(massive.index[0])
    key = at.data_editor[0].key
    at.session_state[key] = {"edited_rows": {row: {"on": True}}, "added_rows": [], "deleted_rows": []}
    at.run()
    ui_ok(at)
    assert at.session_state["steer_generations"][1] != base
    ivs = parse(yaml.safe_load(at.session_state["steer_study_yaml"])["conditions"][0]["interventions"])
    assert [(iv.op, iv.layers, iv.channel) for iv in ivs] == [("zero_channel", (11,), 507)]


def test_dense_rows_to_interventions():
    import pandas as pd

    from workbench.ui.steer_page import blank_dense_rows, interventions_from_dense_rows

    rows = pd.DataFrame([
        {"on": True, "op": "scale_channel", "layer": 3, "index": 7, "factor": 2.5, "positions": "0, -1", "why": ""},
        {"on": False, "op": "zero_head", "layer": 1, "index": 2, "factor": None, "positions": None, "why": ""},
        {"on": True, "op": "zero_head", "layer": 1, "index": 2, "factor": None, "positions": None, "why": ""},
        {"on": True, "op": "zero_neuron", "layer": 0, "index": 99, "factor": float("nan"), "positions": "", "why": ""}])
    assert interventions_from_dense_rows(rows) == [
        {"op": "scale_channel", "layers": [3], "channel": 7, "factor": 2.5, "positions": [0, -1]},
        {"op": "zero_head", "layers": [1], "heads": [2]}, {"op": "zero_neuron", "layers": [0], "channel": 99}]
    assert interventions_from_dense_rows(blank_dense_rows()) == []
    half = pd.DataFrame([{"on": True, "op": None, "layer": 3, "index": None, "factor": None, "positions": "", "why": ""}])
    with pytest.raises(WorkbenchError, match="dense table row 1: pick an op"):
        interventions_from_dense_rows(half)


def test_a_model_folder_rewritten_while_the_app_runs_is_loaded_again(tmp_path, zoo_tokenizer):
    """The model (and every result keyed by its spec) was cached by the path alone: after another checkpoint was
    saved into the folder, even a reloaded page showed the old architecture and its old generations."""
    import os
    import shutil

    from workbench.models.families import save_tiny

    folder = tmp_path / "m"
    save_tiny("granitemoeshared", folder, zoo_tokenizer)
    at = AppTest.from_file(APP, default_timeout=90).run()
    at.sidebar.selectbox(key="model_choice").set_value("(local path or hub id)").run()
    at.sidebar.text_input(key="model_path").input(str(folder)).run()
    assert any("GraniteMoeShared" in c.value for c in at.sidebar.caption)
    shutil.rmtree(folder)
    save_tiny("phimoe", folder, zoo_tokenizer)
    for f in folder.iterdir():  # a later modification time, whatever the file system's clock resolution
        os.utime(f, ns=(f.stat().st_mtime_ns + 10**9, f.stat().st_mtime_ns + 10**9))
    fresh = AppTest.from_file(APP, default_timeout=90).run()  # a reloaded page: a new session, the same caches
    fresh.sidebar.selectbox(key="model_choice").set_value("(local path or hub id)").run()
    fresh.sidebar.text_input(key="model_path").input(str(folder)).run()
    assert any("Phimoe" in c.value for c in fresh.sidebar.caption), [c.value for c in fresh.sidebar.caption]


def test_the_steer_caption_names_a_shared_expert_as_shared():
    """`{op: zero, kind: shared, expert: 0}` read "zero L1-3.E0", the caption of routed expert 0."""
    from workbench.ui.steer_page import describe

    assert describe({"op": "zero", "kind": "shared", "layers": [1, 2, 3], "expert": 0}) == "zero L1-3.S0"
    assert describe({"op": "zero", "layers": [1, 2, 3], "expert": 0}) == "zero L1-3.E0"
