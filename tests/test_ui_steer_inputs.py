"""The Steer page on inputs a newcomer's sweep tried (AppTest, zoo:qwen3-moe: 4 layers x 8 experts, context 512):
each is a correct page or a clear message, never an internal error or a silent no-op."""

import pandas as pd
import pytest
import yaml

from helpers import ui_app, ui_edit, ui_ok, ui_one_error
from workbench.errors import WorkbenchError
from workbench.ui.steer_page import interventions_from_sae_rows, parse_positions

pytestmark = pytest.mark.usefixtures("ui_model_argv")


def _warnings(at) -> list[str]:
    return [w.value for w in at.warning]


def test_prompt_beyond_the_context_is_refused():
    at = ui_app("Steer")
    at.text_area(key="steer_prompt").input("x " * 600).run()
    ui_one_error(at, "the prompt has 601 tokens; zoo:qwen3-moe reads at most 512")
    at.text_area(key="steer_prompt").input("x " * 500).run()  # 501 tokens: room for 11 new ones
    ui_ok(at)
    assert any("up to 11 new tokens" in c.value for c in at.caption)


def test_prompt_scoped_ops_steer_the_page_prompt_as_prompt_0():
    """A study numbers its texts; the page's prompt is prompt 0, in the generation as in the metrics (before, a
    ``prompts`` scope changed the KL but never the generation)."""
    at = ui_app("Steer")
    drops = "\n".join(f"- {{op: drop, layers: 0, expert: {e}{{}}}}" for e in range(4))
    at.text_area(key="steer_extra").input(drops.replace("{}", "")).run()
    unscoped = at.session_state["steer_generations"]
    assert unscoped[1] != unscoped[0]  # the four drops change the continuation
    at.text_area(key="steer_extra").input(drops.replace("{}", ", prompts: [0]")).run()
    ui_ok(at)
    assert at.session_state["steer_generations"] == unscoped
    assert any("drop L0.E0 prompts 0" in c.value for c in at.caption)
    at.text_area(key="steer_extra").input(drops.replace("{}", ", prompts: [3]")).run()
    assert at.session_state["steer_generations"][1] == unscoped[0]
    assert any("leave out the page's prompt" in w for w in _warnings(at)), _warnings(at)


def test_dropping_every_expert_of_a_layer_is_refused():
    at = ui_app("Steer")
    ui_edit(at, 0, {i: {"drop": True} for i in range(8)})
    ui_one_error(at, "drop removes all 8 routed experts of layer 0")
    ui_edit(at, 0, {7: {"drop": False}})  # seven of eight leave one to route to
    ui_ok(at)


def test_non_finite_outputs_are_flagged():
    at = ui_app("Steer")
    big = "\n".join(f"- {{op: scale_channel, layers: {layer}, channel: {c}, factor: 1.0e+38}}"
                    for layer in range(4) for c in range(3))  # residual values overflow float32: NaN logits
    at.text_area(key="steer_extra").input(big).run()
    ui_ok(at)
    assert any("not finite" in w for w in _warnings(at)), _warnings(at)


def test_scopes_that_touch_nothing_are_flagged():
    at = ui_app("Steer")
    ui_edit(at, 0, {1: {"zero": True, "positions": "999"}})
    assert any("positions [999] are beyond the prompt" in w for w in _warnings(at)), _warnings(at)
    ui_edit(at, 0, {1: {"zero": True, "positions": "", "token": "zzzq"}})
    assert any("token 'zzzq' is in no token" in w for w in _warnings(at)), _warnings(at)
    ui_edit(at, 0, {1: {"zero": True, "token": "France"}})  # "The capital of France is": touches one
    ui_ok(at)
    assert not _warnings(at)
    with pytest.raises(WorkbenchError, match="write integers"):
        parse_positions("\u0661", "row")  # an Arabic-Indic one: int() reads it, a position is ASCII digits


def test_fractional_feature_is_refused():
    rows = pd.DataFrame([{"sae": "x", "feature": 3.7, "coef": 1.0, "positions": "", "token": "", "site": ""}])
    with pytest.raises(WorkbenchError, match="feature row 1: feature 3.7: a feature index is a whole number"):
        interventions_from_sae_rows(rows, None)


def _upload(at, name: str, data: bytes) -> None:
    at.file_uploader(key="steer_upload").set_value((name, data, "application/x-yaml"))
    at.run()


def _study(*ivs: dict) -> bytes:
    return yaml.safe_dump({"name": "s", "conditions": [{"name": "c", "interventions": list(ivs)}]}).encode()


def test_malformed_and_edited_uploads():
    at = ui_app("Steer")
    _upload(at, "s.yaml", b"name: x\nconditions: [")
    assert ui_one_error(at).startswith("error: s.yaml line 2: not valid YAML")
    _upload(at, "s.yaml", b"\xff\xfe\x00")
    assert ui_one_error(at) == "error: s.yaml is not UTF-8 text"
    _upload(at, "s.yaml", _study({"op": "drop", "layers": 0, "expert": 1}))
    assert bool(at.session_state["steer_tables"][0].loc[1, "drop"])
    _upload(at, "s.yaml", _study({"op": "drop", "layers": 0, "expert": 2}))  # same name and size, edited
    table = at.session_state["steer_tables"][0]
    assert bool(table.loc[2, "drop"]) and not bool(table.loc[1, "drop"])


def test_two_ops_of_one_kind_on_one_expert_are_refused():
    """The table holds one scale per expert: a second would be lost while the file applies both (x6)."""
    at = ui_app("Steer")
    _upload(at, "s.yaml", _study({"op": "scale", "layers": 0, "expert": 1, "factor": 2},
                                 {"op": "scale", "layers": 0, "expert": 1, "factor": 3}))
    ui_one_error(at, "layer 0 expert 1 already has a 'scale' op")
    assert float(at.session_state["steer_tables"][0].loc[1, "scale"]) == 1.0  # nothing loaded


def test_switching_model_says_the_tables_start_empty():
    at = ui_app("Steer")
    ui_edit(at, 0, {1: {"drop": True}})
    at.sidebar.selectbox(key="model_choice").set_value("zoo:olmoe").run()
    ui_ok(at)
    assert any("held interventions for zoo:qwen3-moe; they start empty for zoo:olmoe" in i.value for i in at.info)
    at.run()  # said once
    assert not any("held interventions" in i.value for i in at.info)
    at.sidebar.selectbox(key="model_choice").set_value("zoo:qwen3-moe").run()  # nothing held: nothing to say
    assert not any("held interventions" in i.value for i in at.info)


def test_the_same_file_uploaded_again_after_clearing_is_loaded_again():
    """Uploads are told apart by content, and clearing the uploader forgets the file (as on the Profile and Circuits
    pages): the page once ignored a re-upload of the file it had loaded, so an edited table stayed."""
    at = ui_app("Steer")
    _upload(at, "s.yaml", _study({"op": "drop", "layers": 0, "expert": 1}))
    ui_edit(at, 0, {1: {"drop": False}, 3: {"drop": True}})
    assert bool(at.session_state["steer_tables"][0].loc[3, "drop"])
    at.file_uploader(key="steer_upload").set_value(None).run()
    _upload(at, "s.yaml", _study({"op": "drop", "layers": 0, "expert": 1}))
    table = at.session_state["steer_tables"][0]
    assert bool(table.loc[1, "drop"]) and not bool(table.loc[3, "drop"])
