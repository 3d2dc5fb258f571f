"""The app with an SAE (workbench.sae), driven headless with AppTest on zoo:qwen3-moe: the sidebar's SAE
folder, SAE features in the Profile page's expert detail and on circuit nodes (and in the downloads), and
``sae_steer`` rows in the Steer page's study YAML."""

import time
from pathlib import Path

import networkx as nx
import pytest
import torch
import yaml
from streamlit.testing.v1 import AppTest

import workbench as wb
from helpers import APP, UI_MODEL, ui_ok
from workbench.circuits.export import Circuit, read_json, write_graphml, write_json
from workbench.studies import Study

pytest.importorskip("sae_lens")
from sae_lens import StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

FEATURES_SHOWN = "top activating tokens"  # a column of the SAE feature tables


pytestmark = pytest.mark.usefixtures("ui_model_argv")


def make_sae(path: Path, d_in: int = 64, d_sae: int = 32, hook: str = "blocks.1.hook_resid_post") -> Path:
    """A StandardSAE built and saved with SAELens' own classes and format (as tests/test_sae.py does)."""
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    sae.save_model(path)
    return path


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    return make_sae(tmp_path_factory.mktemp("sae") / "L1")


def _app(page: str, sae: Path | None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120).run()
    if sae is not None:
        at.sidebar.text_input(key="sae_path").input(str(sae)).run()
    at.sidebar.radio(key="page").set_value(page).run()
    ui_ok(at)
    return at


def _feature_table(at: AppTest):
    tables = [d.value for d in at.dataframe if FEATURES_SHOWN in d.value.columns]
    assert len(tables) == 1, [list(d.value.columns) for d in at.dataframe]
    return tables[0]


def test_bad_sae_folder_shows_error_and_app_keeps_running(sae_dir, tmp_path):
    at = _app("Steer", None)
    box = at.sidebar.text_input(key="sae_path")
    box.input(str(tmp_path / "no-such-sae")).run()
    assert not at.exception and any("not a directory" in e.value for e in at.error)
    assert at.session_state["steer_generations"]  # the page still renders below the error
    (tmp_path / "empty").mkdir()
    at.sidebar.text_input(key="sae_path").input(str(tmp_path / "empty")).run()
    assert not at.exception and any("no cfg.json" in e.value for e in at.error)
    narrow = make_sae(tmp_path / "narrow", d_in=32)  # does not fit the model's 64-wide residual stream
    at.sidebar.text_input(key="sae_path").input(str(narrow)).run()
    assert not at.exception and any("d_in 32 does not fit site L1.resid_post" in e.value for e in at.error)
    late = make_sae(tmp_path / "late", hook="blocks.9.hook_resid_post")  # layer 9 of a 4-layer model
    at.sidebar.text_input(key="sae_path").input(str(late)).run()
    assert not at.exception and any("out of range" in e.value for e in at.error)
    at.sidebar.text_input(key="sae_path").input(str(sae_dir)).run()
    ui_ok(at)
    assert any("32 features at L1.resid_post" in c.value for c in at.sidebar.caption)
    assert any("SAE feature steering" in m.value for m in at.markdown)


def test_profile_expert_detail_shows_sae_features(sae_dir):
    from workbench.sae import expert_features, load_sae
    from workbench.ui.common import FEATURE_TOKENS, FEATURE_TOP, feature_prompts

    at = _app("Profile", sae_dir)
    at.number_input(key="profile_max_tokens").set_value(16)
    at.text_area(key="profile_prompts").input("The capital of France is Paris.\nWater boils at 100 degrees.")
    at.button(key="profile_run").click().run()
    ui_ok(at)
    start = time.perf_counter()
    at.selectbox(key="profile_pick_layer").set_value(1).run()  # what a click on a heatmap cell does
    at.selectbox(key="profile_pick_expert").set_value(2).run()
    print(f"pick an expert, SAE features from the cache: {time.perf_counter() - start:.2f} s")
    ui_ok(at)
    shown = _feature_table(at)
    assert list(shown.columns[:3]) == ["rank", "feature", "score"] and len(shown) >= 1
    assert (shown.score > 0).all() and shown[FEATURES_SHOWN].str.len().gt(0).all()
    # the same numbers as the API on the same prompts
    lm = wb.load(UI_MODEL)
    report = expert_features(lm, load_sae(sae_dir), feature_prompts(), experts=[(1, 2)], top=FEATURE_TOP,
                             top_tokens=5, max_tokens=FEATURE_TOKENS)
    assert list(shown.feature) == list(report.table.feature)
    assert list(shown.score) == pytest.approx(list(report.table.score), rel=1e-5)

    start = time.perf_counter()
    at.selectbox(key="profile_pick_expert").set_value(5).run()  # from the cache
    print(f"another expert: {time.perf_counter() - start:.2f} s")
    ui_ok(at)
    assert len(_feature_table(at)) >= 1
    at.selectbox(key="profile_pick_layer").set_value(3).run()  # writes after the SAE's site
    ui_ok(at)
    assert any("does not write into the SAE's site L1.resid_post" in i.value for i in at.info)
    assert not [d for d in at.dataframe if FEATURES_SHOWN in d.value.columns]


def _circuit(path: Path) -> Path:
    nodes = {"input": {"kind": "input", "layer": -1, "index": 0},
             "a0.h1": {"kind": "head", "layer": 0, "index": 1},
             "m0.e3": {"kind": "expert", "layer": 0, "index": 3},
             "a1.h0": {"kind": "head", "layer": 1, "index": 0},
             "m1.e2": {"kind": "expert", "layer": 1, "index": 2},
             "m2.e0": {"kind": "expert", "layer": 2, "index": 0},  # after the SAE's site: no features
             "logits": {"kind": "logits", "layer": 4, "index": 0}}
    edges = [{"source": "input", "target": "a0.h1", "port": "q", "score": 0.5},
             {"source": "a0.h1", "target": "m0.e3", "port": "in", "score": 1.5},
             {"source": "m0.e3", "target": "a1.h0", "port": "v", "score": 0.7},
             {"source": "a1.h0", "target": "m1.e2", "port": "in", "score": -0.4},
             {"source": "m1.e2", "target": "m2.e0", "port": "in", "score": 0.3},
             {"source": "m2.e0", "target": "logits", "port": "in", "score": 2.0}]
    return write_json(Circuit(nodes, edges, {"model": UI_MODEL, "method": "eap"}), path / "circuit.json")


def test_circuit_node_features_shown_and_exported(sae_dir, tmp_path):
    from workbench.ui.circuits_page import picked_node

    at = _app("Circuits", sae_dir)
    at.text_input(key="circuit_path").input(str(_circuit(tmp_path))).run()
    ui_ok(at)
    assert at.selectbox(key="circuit_node").value == "a0.h1"  # the first head / MLP / expert
    assert len(_feature_table(at)) >= 1
    at.selectbox(key="circuit_node").set_value("m1.e2").run()  # what a click on the node does
    ui_ok(at)
    shown = _feature_table(at)
    assert any("Top SAE features of m1.e2" in m.value for m in at.markdown)
    at.selectbox(key="circuit_node").set_value("m2.e0").run()
    ui_ok(at)
    assert any("m2.e0: no SAE features" in i.value for i in at.info)

    # the downloads carry every reading node's features as node attributes
    out = at.session_state["circuit_export"]
    assert set(n for n, a in out.nodes.items() if "sae_features" in a) == {"a0.h1", "m0.e3", "a1.h0", "m1.e2"}
    assert out.nodes["m1.e2"]["sae_features"].split(",") == [str(f) for f in shown.feature]
    assert out.nodes["m1.e2"]["sae_site"] == "L1.resid_post"
    back = read_json(write_json(out, tmp_path / "annotated.json"))
    assert back.nodes["m1.e2"]["sae_top_feature"] == int(shown.feature.iloc[0])
    g = nx.read_graphml(write_graphml(out, tmp_path / "annotated.graphml"))
    assert g.nodes["a1.h0"]["sae_site"] == "L1.resid_post" and "sae_features" not in g.nodes["m2.e0"]

    # a click on a node marker picks it (edges carry no customdata)
    click = {"curve_number": 7, "point_index": 0, "x": 0.5, "y": 1.5, "customdata": "m0.e3"}
    assert picked_node([click], out.nodes) == "m0.e3"
    assert picked_node([{"curve_number": 0, "x": 0.2, "y": 0.0}, click, {"customdata": "nope"}], out.nodes) == "m0.e3"
    assert picked_node([], out.nodes) is None

    # without an SAE: no features, plain downloads
    at.sidebar.text_input(key="sae_path").input("").run()
    ui_ok(at)
    assert not [d for d in at.dataframe if FEATURES_SHOWN in d.value.columns]
    assert "sae_features" not in at.session_state["circuit_export"].nodes["m1.e2"]


def _edit_sae_rows(at: AppTest, rows: list[dict]) -> None:
    key = f"steer_sae_editor_{at.session_state['steer_version']}"
    at.session_state[key] = {"edited_rows": {}, "added_rows": rows, "deleted_rows": []}
    at.run()


def test_steer_sae_row_reaches_study_yaml_and_round_trips(sae_dir, tmp_path):
    at = _app("Steer", sae_dir)
    base, _ = at.session_state["steer_generations"]
    key = f"steer_editor_0_{at.session_state['steer_version']}"
    at.session_state[key] = {"edited_rows": {1: {"drop": True}}, "added_rows": [], "deleted_rows": []}
    at.run()
    _edit_sae_rows(at, [{"feature": 3, "coef": 40.0, "positions": "-1"}])
    ui_ok(at)
    assert any("drop L0.E1, sae_steer f3 x40 @-1" in c.value for c in at.caption)
    steered = at.session_state["steer_generations"][1]
    assert steered != base
    assert at.checkbox(key="steer_split").value

    # the study YAML: expert ablation and feature steering side by side, as `workbench ablate` reads it
    path = tmp_path / "ui_study.yaml"
    path.write_text(at.session_state["steer_study_yaml"])
    spec = yaml.safe_load(path.read_text())
    assert [c["name"] for c in spec["conditions"]] == ["ui experts", "ui features"]
    assert spec["conditions"][1]["interventions"] == [
        {"op": "sae_steer", "sae": str(sae_dir.resolve()), "feature": 3, "coef": 40.0, "positions": [-1]}]
    study = Study.from_file(path)
    lm = wb.load(UI_MODEL)
    conditions = study.resolve(lm)
    assert [c.name for c in conditions] == ["baseline", "ui experts", "ui features"]
    steer = conditions[2].interventions[0]
    assert (steer.op, steer.feature, steer.coef, steer.layers, steer.site, steer.positions) == (
        "sae_steer", 3, 40.0, (1,), "L1.resid_post", (-1,))
    small = Study({**spec, "num_texts": 2, "metrics": ["kl"], "batch_size": 2})
    kl = small.run(lm, tmp_path / "run", progress=False).set_index("condition")["mean"]
    assert kl["baseline"] == 0 and kl["ui experts"] > 0 and kl["ui features"] > 0

    # one condition when the box is cleared; the rows survive a visit to another page
    at.checkbox(key="steer_split").uncheck().run()
    assert [c["name"] for c in yaml.safe_load(at.session_state["steer_study_yaml"])["conditions"]] == ["ui"]
    at.sidebar.radio(key="page").set_value("Profile").run()
    at.sidebar.radio(key="page").set_value("Steer").run()
    ui_ok(at)
    assert at.session_state["steer_generations"][1] == steered
    assert list(at.session_state["steer_sae_rows"].feature) == [3]

    # uploading the split study into a fresh app restores both tables and the steered generation
    fresh = _app("Steer", sae_dir)
    fresh.file_uploader(key="steer_upload").set_value(("ui_study.yaml", path.read_bytes(), "application/x-yaml"))
    fresh.run()
    fresh.run()
    ui_ok(fresh)
    rows = fresh.session_state["steer_sae_rows"]
    assert (list(rows.feature), list(rows.coef), list(rows.positions)) == ([3], [40.0], ["-1"])
    assert list(fresh.session_state["steer_tables"][0]["drop"]) == [False, True] + [False] * 6
    assert fresh.session_state["steer_generations"][1] == steered
    assert yaml.safe_load(fresh.session_state["steer_study_yaml"]) == spec

    # a feature out of the SAE's range is a message, not a crash
    _edit_sae_rows(fresh, [{"feature": 99, "coef": 1.0}])
    assert not fresh.exception
    assert any("field 'feature': 99 out of range" in e.value for e in fresh.error)


def test_steer_feature_rows_need_an_sae():
    at = _app("Steer", None)
    assert any("load an SAE folder in the sidebar to steer SAE features" in c.value for c in at.caption)
    assert "steer_split" not in [w.key for w in at.checkbox]


def test_sae_from_argv_and_cli(sae_dir, monkeypatch):
    import sys

    from workbench.ui.cli import command

    assert command(UI_MODEL, 8501, sae=str(sae_dir))[-4:] == ["--model", UI_MODEL, "--sae", str(sae_dir)]
    monkeypatch.setattr(sys, "argv", ["app.py", "--model", UI_MODEL, "--sae", str(sae_dir)])
    at = AppTest.from_file(APP, default_timeout=120).run()
    ui_ok(at)
    assert at.sidebar.text_input(key="sae_path").value == str(sae_dir)
    assert any("32 features at L1.resid_post" in c.value for c in at.sidebar.caption)
