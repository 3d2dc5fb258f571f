"""`workbench report`: one self-contained HTML page per output folder."""

import json
import math
import re
import shutil

import pytest

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.report import report

PROMPTS = ["The capital of France is Paris.", "Bees collect nectar from flowers.", "One, two, three, four."]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A profile (planted super expert), a study and a circuit folder, each written by its command."""
    root = tmp_path_factory.mktemp("runs")
    prompts = root / "p.txt"
    prompts.write_text("\n".join(PROMPTS * 4) + "\n")
    assert main(["profile", "zoo:tiny-moe-se", "--prompts", str(prompts), "--out", str(root / "profile"), "--quiet"]) == 0
    study = root / "study.yaml"
    study.write_text("conditions:\n  - name: zero_L1E5\n    interventions: [{op: zero, layers: [1], "
                     "expert: 5}]\nmetrics: [perplexity]\nnum_texts: 8\n")
    assert main(["ablate", "zoo:tiny-moe-se", "--study", str(study), "--out", str(root / "study"), "--quiet"]) == 0
    facts = root / "facts.jsonl"
    facts.write_text("".join(json.dumps({"prompt": f"The capital of {c} is", "answer": f" {a}"}) + "\n"
                             for c, a in [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid")]))
    assert main(["circuit", "zoo:tiny-moe", "--facts", str(facts), "--out", str(root / "circuit"), "--quiet",
                 "--no-curve", "--random-seeds", "1", "--steps", "2"]) == 0
    return root


def test_each_command_writes_its_report(runs, capsys):
    for name in ("profile", "study", "circuit"):
        page = (runs / name / "report.html").read_text()
        assert page.startswith("<!doctype html>") and "<h2>Findings</h2>" in page
        assert "<script" not in page and not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing to fetch
    prof = (runs / "profile" / "report.html").read_text()
    assert "<b>Super expert</b>: layer 1 expert 5 (routed)" in prof and "channel 17" in prof
    # the Q/K finding the CLI prints (the page listed only its plots)
    assert re.search(r"<b>Massive values in attention</b>: the largest top-dim / median norm ratio is q [\d.]+ "
                     r"\(L\d+\.H\d+ dim \d+", prof)
    assert prof.count("data:image/png;base64,") == len(list((runs / "profile").glob("*.png")))
    study = (runs / "study" / "report.html").read_text()
    assert "zero_L1E5" in study and "<b>perplexity</b>: baseline" in study
    circ = (runs / "circuit" / "report.html").read_text()
    assert "<b>Hit@10</b>" in circ and "<svg" in circ


def test_report_command_and_incomplete_folders(runs, tmp_path, capsys):
    out = tmp_path / "copy.html"
    assert main(["report", str(runs / "profile"), "--out", str(out)]) == 0
    assert out.read_text() == (runs / "profile" / "report.html").read_text()
    half = tmp_path / "half"
    half.mkdir()
    (half / "run.json").write_text("{}")
    assert main(["report", str(half)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has run.json but no profile.json" in err and not (half / "report.html").exists()
    (half / "metrics.json").write_text("{}")
    with pytest.raises(WorkbenchError, match="has metrics.json but not circuit.json"):
        report(half)
    with pytest.raises(WorkbenchError, match="holds no finished run"):
        report(tmp_path)
    with pytest.raises(WorkbenchError, match="is not a folder"):
        report(out)


def test_a_circuit_json_on_its_own_carries_its_report(runs, tmp_path):
    """The app's circuit download is circuit.json alone, its evaluation in graph.meta.metrics: `report` said the run
    "did not finish (rerun it)". A circuit.json without an evaluation still says so."""
    import shutil

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(runs / "circuit" / "circuit.json", lone / "circuit.json")
    page = report(lone).read_text()
    assert "<b>Hit@10</b>" in page and "faithfulness" in page
    bare = json.loads((lone / "circuit.json").read_text())
    bare["graph"]["meta"].pop("metrics")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "circuit.json").write_text(json.dumps(bare))
    with pytest.raises(WorkbenchError, match="has circuit.json but no metrics.json: the run did not finish"):
        report(tmp_path / "bare")


def test_a_profile_json_missing_sections_is_one_error(tmp_path, capsys):
    """A profile.json cut down by hand (or by another tool) names what it lacks instead of a KeyError."""
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "profile.json").write_text('{"experts": [], "meta": {}}')
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a profile.json (missing super_experts, super_expert_rule" in err, err
    assert not (folder / "report.html").exists()


def test_an_sae_folder_is_named_as_such(tmp_path):
    """An ``sae train`` folder holds a metrics.json too: it is not "an incomplete circuit output"."""
    for name in ("cfg.json", "sae_weights.safetensors", "metrics.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(WorkbenchError, match="holds an SAE .sae train.*which report does not cover"):
        report(tmp_path)


def test_the_routing_report_names_its_checkpoints_and_shows_every_measure(tmp_path):
    """Its table showed a 'middle' checkpoint nobody named (with two checkpoints: the final one, so always 1.000), no
    change rate and no findings."""
    layer = {"layer": 0, "num_experts": 8, "top_k": 2, "saturation": [0.3, 0.95, 1.0],
             "saturation_top1": [0.1, 0.8, 1.0], "change_rate": [None, 0.4, 0.05], "utilization": [0.9, 0.95, 0.97]}
    (tmp_path / "routing.json").write_text(json.dumps({
        "checkpoints": ["zoo:tiny-moe@0", "zoo:tiny-moe@100", "zoo:tiny-moe@300"], "final": "zoo:tiny-moe@300",
        "num_tokens": 1, "num_prompts": 1, "layers": [layer, {**layer, "layer": 1, "saturation": [0.2, 0.5, 1.0]}]}))
    page = report(tmp_path).read_text()
    text = re.sub(r"<[^>]+>", "", page)
    assert "3 checkpoints (final: zoo:tiny-moe@300), 1 token;" in text
    assert "layer 0: saturation 0.300 at step 0, first 0.9 or more at step 100; top-1 saturation 0.100 -> 0.800; " \
           "change rate vs the previous checkpoint 0.400 first, 0.050 last; utilization (Jain) 0.900 -> 0.970." in text
    assert "layer 1: saturation 0.200 at step 0, 0.500 at step 100, below 0.9 until the final one" in text
    for title in ("Router saturation against the final checkpoint", "Change rate against the previous checkpoint"):
        assert f"<h2>{title}" in page
    assert "middle" not in page and "step 300" in text


def test_a_circuit_report_says_a_noisy_gap_and_refuses_another_runs_metrics(runs, tmp_path):
    """The report showed faithfulness bare where `workbench circuit` had warned it was noise (gap_z under 2), and
    rendered a metrics.json copied beside another run's circuit.json as that circuit's."""
    folder = tmp_path / "c"
    shutil.copytree(runs / "circuit", folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    for gz, says in ((0.6, "(gap_z 0.60)"), (math.nan, "whose gaps are one) gives no spread"), (25.0, None)):
        (folder / "metrics.json").write_text(json.dumps({**metrics, "gap_z": gz}))
        page = report(folder).read_text()
        assert ("The faithfulness figures are noise here" in page) == (says is not None), gz
        assert says is None or says in page
    (folder / "metrics.json").write_text(json.dumps({**metrics, "n_edges": metrics["n_edges"] + 1}))
    with pytest.raises(WorkbenchError, match=r"circuit.json and metrics.json are from different runs \(n_edges "):
        report(folder)


def test_folders_of_commands_without_a_report_say_so(tmp_path):
    """A finished contrast or sae features folder was called one that "holds no finished run"."""
    for name, needle in (("contrast.csv", "holds a finished contrast"),
                         ("expert_features.csv", "finished sae features"),
                         ("node_features.csv", "finished sae features"), ("trace.json", "holds a finished trace")):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / name).write_text("x")
        with pytest.raises(WorkbenchError, match=f"{needle} .*which report does not cover$"):
            report(folder)


def test_ratios_read_as_the_cli_prints_them(runs, tmp_path):
    """The massive activation's ratio to its layer median read "1e+04x" for every ratio of 10,000 or more (SmolLM2's
    14,680x, 12,298x and 14,154x alike), where the CLI and profile.json say 14,680x."""
    import shutil

    folder = tmp_path / "p"
    shutil.copytree(runs / "profile", folder)
    p = json.loads((folder / "profile.json").read_text())
    layers = p["massive_activations"]["layers"]
    first = next(l for l in layers if l.get("top"))
    first["massive"], first["top"][0]["ratio_to_median"] = True, 14680.4  # (this tiny model's is 108, not massive)
    (folder / "profile.json").write_text(json.dumps(p))
    page = report(folder).read_text()
    i = page.find("Massive activation")
    assert "(14,680x the layer median)" in page and "e+04x" not in page, page[i - 20:i + 300]
    assert re.search(r"\), \d+\.\dx the median expert maximum", page)  # under 100: one decimal, as before
