"""The Profile page's inputs, driven headless with AppTest: bad uploads are one error line and never stored, the
latest of run / upload / open is what the page shows, and the page works without a model."""

import json

import pytest
from streamlit.testing.v1 import AppTest

import workbench as wb
from helpers import APP, UI_MODEL, ui_app, ui_ok, ui_one_error
from workbench.errors import WorkbenchError
from workbench.experts.profile import ProfileOptions, profile
from workbench.experts.report import check_profile, write

pytestmark = pytest.mark.usefixtures("ui_model_argv")

NO_PROFILE = "Run a profile or open a profile.json."


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A profile.json of two prompts as `workbench profile` writes it (no timings), and the profile itself."""
    lm = wb.load(UI_MODEL)
    p = profile(lm, ["The capital of France is Paris.", "Water boils at 100 degrees."], ProfileOptions(max_tokens=16),
                progress=False)
    out = tmp_path_factory.mktemp("profile")
    write(p, out, plots=False)
    return out / "profile.json", p


def _upload(at: AppTest, name: str, data: bytes | None) -> None:
    at.file_uploader(key="profile_upload").set_value(None if data is None else (name, data, "application/json"))
    at.run()


def _shown(at: AppTest) -> int:
    """num_prompts of the profile the page shows (its caption), after checking the page has no error."""
    ui_ok(at)
    return at.session_state["profile"]["meta"]["num_prompts"]


def test_half_valid_profile_is_one_error_naming_what_is_missing_and_never_stored():
    at = ui_app("Profile")
    _upload(at, "half.json", b'{"experts": [], "meta": {}}')
    ui_one_error(at, "half.json", "missing super_experts, super_expert_rule, massive_activations")
    assert "profile" not in at.session_state
    _upload(at, "half.json", None)  # cleared: nothing of it stays behind
    ui_ok(at)
    assert "profile" not in at.session_state and [i.value for i in at.info] == [NO_PROFILE]


@pytest.mark.parametrize("breaks, needle", [
    (lambda p: p.pop("massive_activations"), "missing massive_activations"),
    (lambda p: p["massive_activations"].pop("layers"), "no 'massive_activations.layers' list"),
    (lambda p: p.__setitem__("super_experts", {}), "'super_experts' is not a JSON list"),
    (lambda p: p["meta"].pop("num_layers"), "meta has no num_layers"),
    (lambda p: p["experts"][3].pop("max_abs"), "experts[3] has no max_abs"),
    (lambda p: p["experts"].__setitem__(1, 7), "experts[1] is not an object"),
    (lambda p: p["massive_activations"]["layers"][0].pop("top"), "massive_activations.layers[0] has no top"),
    (lambda p: p["experts"][0].__setitem__("layer", 99), "experts[0] is layer 99"),
    (lambda p: p.__setitem__("experts", [dict(e, kind="shared") for e in p["experts"]]), "no routed or dense"),
])
def test_check_profile_names_what_the_page_and_report_would_miss(saved, breaks, needle):
    p = json.loads(saved[0].read_text())
    assert check_profile(p, "p.json") is p  # what `workbench profile` writes passes
    breaks(p)
    with pytest.raises(WorkbenchError, match="^p.json: not a profile.json") as e:
        check_profile(p, "p.json")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_malformed_uploads_and_files_are_one_error_line(tmp_path):
    at = ui_app("Profile")
    for name, data, needle in [("bad.json", b"\xff\xfe\x00", "bad.json is not UTF-8 text"),
                               ("cut.json", b'{"experts": [', "cut.json line 1: not valid JSON"),
                               ("list.json", b"[1, 2]", "list.json: not a profile.json (a JSON list, not an object)"),
                               ("deep.json", b"[" * 100_000, "deep.json: nested too deeply to read")]:
        _upload(at, name, data)
        ui_one_error(at, needle)
        assert "profile" not in at.session_state
    _upload(at, "deep.json", None)
    bad = tmp_path / "profile.json"
    bad.write_bytes(b"\xff\xfe\x00")
    at.text_input(key="profile_path").input(str(tmp_path)).run()
    at.button(key="profile_open").click().run()
    ui_one_error(at, f"{bad} is not UTF-8 text")
    assert "profile" not in at.session_state


def test_the_latest_action_wins_while_a_file_sits_in_the_uploader(saved, tmp_path):
    path, _ = saved
    at = ui_app("Profile")
    at.number_input(key="profile_max_tokens").set_value(8)
    _upload(at, "profile.json", path.read_bytes())
    assert _shown(at) == 2
    at.text_area(key="profile_prompts").input("One.\nTwo.\nThree.")
    at.button(key="profile_run").click().run()
    assert _shown(at) == 3  # the run, not the upload parsed again after it
    at.run()
    assert _shown(at) == 3
    ran = at.session_state["profile"]
    one = tmp_path / "one.json"
    one.write_text(json.dumps({**ran, "meta": {**ran["meta"], "num_prompts": 1}}))
    at.text_input(key="profile_path").input(str(one)).run()
    assert _shown(at) == 3  # typing a path opens nothing yet
    at.button(key="profile_open").click().run()  # the Open button is there with a file in the uploader
    assert _shown(at) == 1
    at.run()
    assert _shown(at) == 1
    _upload(at, "three.json", json.dumps(ran).encode())  # a new upload shows the upload
    assert _shown(at) == 3
    at.button(key="profile_open").click().run()
    assert _shown(at) == 1
    _upload(at, "three.json", None)  # the same file uploaded again after clearing it is new again
    assert _shown(at) == 1
    _upload(at, "three.json", json.dumps(ran).encode())
    assert _shown(at) == 3
    _upload(at, "half.json", b'{"experts": [], "meta": {}}')  # a bad upload leaves the last good profile
    ui_one_error(at, "half.json")
    assert at.session_state["profile"]["meta"]["num_prompts"] == 3


def test_profile_page_opens_a_saved_profile_without_a_model(saved):
    path, _ = saved
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.sidebar.selectbox(key="model_choice").set_value("(local path or hub id)").run()
    at.sidebar.text_input(key="model_path").input("hf:does/not-exist").run()
    load_error = ui_one_error(at, "does/not-exist")
    at.sidebar.radio(key="page").set_value("Profile").run()
    assert [h.value for h in at.header] == ["Profile: super experts, router, massive activations, attention sinks"]
    assert at.button(key="profile_run").disabled
    assert any("No model is loaded" in c.value for c in at.caption)
    assert [i.value for i in at.info] == [NO_PROFILE]
    at.text_input(key="profile_path").input(str(path)).run()
    at.button(key="profile_open").click().run()
    assert [e.value for e in at.error] == [load_error] and not at.exception
    assert at.session_state["profile"]["meta"]["num_prompts"] == 2 and len(at.get("plotly_chart")) == 11
    assert at.button(key="profile_pick_add").disabled  # steering the expert needs the model
    # Steer cannot work without a model, and says so; Circuits opens a circuit.json without one
    at.sidebar.radio(key="page").set_value("Steer").run()
    assert [e.value for e in at.error] == [load_error] and not at.exception
    assert any("needs a model" in i.value for i in at.info)
    at.sidebar.radio(key="page").set_value("Circuits").run()
    assert [e.value for e in at.error] == [load_error] and not at.exception
    assert [h.value for h in at.header] == ["Circuits"]


def test_a_built_report_goes_with_its_own_profile(saved, tmp_path):
    """The report built for one profile is not offered for the next one (matched by a serial number: a new
    profile's id() can be the freed last one's)."""
    path, p = saved
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**p, "meta": {**p["meta"], "num_prompts": 1}}))
    at = ui_app("Profile")
    at.text_input(key="profile_path").input(str(path)).run()
    at.button(key="profile_open").click().run()
    at.button(key="profile_report").click().run()
    ui_ok(at)
    assert [b.proto.label for b in at.get("download_button")] == ["Download report.html"]
    at.text_input(key="profile_path").input(str(other)).run()
    at.button(key="profile_open").click().run()
    assert _shown(at) == 1 and not at.get("download_button")  # built again on request only
