"""workbench circuit-evolution: each checkpoint's circuit on the same facts, compared with the final one."""

import dataclasses
import json

import pandas as pd
import pytest

from workbench.circuits.discover import CircuitOptions
from workbench.circuits.evolution import evolution
from workbench.circuits.export import Circuit
from workbench.circuits.facts import builtin_facts
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.models.specs import load

OPTS = CircuitOptions(top_edges=12, steps=2, random_seeds=1, per_relation=False)


@pytest.fixture(scope="module")
def facts():
    return [f for f in builtin_facts() if f.relation == "capital_of"][:6]


def test_same_checkpoint_twice_gives_the_same_circuit(facts):
    lm = load("zoo:tiny-moe")
    r, circuits = evolution(["a", "b"], facts, load=lambda s: lm, options=OPTS)
    a, b = r["rows"]
    assert a["edge_jaccard_final"] == b["edge_jaccard_final"] == 1.0 and a["node_jaccard_final"] == 1.0
    assert a["faithfulness"] == b["faithfulness"] and a["composition"] == b["composition"]
    assert a["n_edges"] == circuits[0].n_edges <= 12 and sum(a["composition"].values()) > 0
    # every writer kind of the MoE's graph, none it lacks (it showed "mlp 0" and left experts out until one joined)
    assert {"head", "expert", "router"} <= set(a["composition"]) and "mlp" not in a["composition"]
    assert r["n_facts"] == 6 and r["n_edges_total"] == circuits[0].meta["n_edges_total"]


def test_different_checkpoints_and_refusals(facts):
    trained, qwen3, dsv3 = load("zoo:tiny-moe"), load("zoo:qwen3-moe"), load("zoo:deepseek-v3")
    r, circuits = evolution(["random", "trained"], facts, load=lambda s: qwen3 if s == "random" else trained,
                            options=OPTS)
    assert r["rows"][0]["edge_jaccard_final"] < 1.0 and r["rows"][1]["edge_jaccard_final"] == 1.0
    # another model is said (and its graph of other edges refused); facts tokenized otherwise are refused before the
    # second checkpoint's circuit is searched
    with pytest.warns(UserWarning, match="^b is a DeepseekV3ForCausalLM, a a Qwen3MoeForCausalLM: the circuits "
                                         "compared are of two models"):
        with pytest.raises(WorkbenchError, match="share the architecture"):
            evolution(["a", "b"], facts, load=lambda s: qwen3 if s == "a" else dsv3, options=OPTS)

    class Shifted:  # the same tokenizer with one more leading token
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, text, **kw):
            return {"input_ids": [1] + self.tok(text, **kw)["input_ids"]}

        def __getattr__(self, name):
            return getattr(self.tok, name)
    other = dataclasses.replace(qwen3, tokenizer=Shifted(qwen3.tokenizer))
    with pytest.raises(WorkbenchError, match="^b tokenizes the facts differently from a: checkpoints of one series "
                                             "must share the tokenizer$"):
        evolution(["a", "b"], facts, load=lambda s: qwen3 if s == "a" else other, options=OPTS)
    with pytest.raises(WorkbenchError, match="at least two checkpoints"):
        evolution(["a"], facts, load=lambda s: qwen3, options=OPTS)


def test_cli_writes_evolution_files(tmp_path, capsys, facts):
    f = tmp_path / "facts.jsonl"
    f.write_text("".join(json.dumps({"prompt": x.prompt, "answer": x.answer}) + "\n" for x in facts))
    out = tmp_path / "out"
    assert main(["circuit-evolution", "zoo:qwen3-moe", "zoo:tiny-moe", "--facts", str(f), "--top-edges", "10",
                 "--steps", "2", "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "evolution.json").read_text())
    assert [row["spec"] for row in r["rows"]] == ["zoo:qwen3-moe", "zoo:tiny-moe"]
    assert len(pd.read_parquet(out / "evolution.parquet")) == 2 and (out / "evolution.png").stat().st_size > 10_000
    assert sorted(p.name for p in (out / "circuits").iterdir()) == ["ckpt0.json", "ckpt1.json"]
    printed = capsys.readouterr().out
    assert "Hit@10 full" in printed
    sizes = sorted({row["n_edges"] for row in r["rows"]})  # the header gives every checkpoint's size
    assert (f"{sizes[0]}-edge circuits" if len(sizes) == 1 else f"{sizes[0]}- to {sizes[-1]}-edge circuits") in printed
    assert main(["circuit-evolution", "zoo:qwen3-moe", "--out", str(tmp_path / "x")]) == 2
    assert "at least two checkpoints" in capsys.readouterr().err


def test_a_rerun_into_the_folder_leaves_nothing_of_the_last_run(tmp_path):
    """Fewer checkpoints and no plot this time: the last run's ckpt2.json and evolution.png are not left to pass
    for this run's (report.html shows every PNG of the folder)."""
    from workbench.circuits.evolution import write

    c = Circuit({"a": {"kind": "input", "layer": -1, "index": -1}, "b": {"kind": "logits", "layer": 1, "index": -1}},
                [{"source": "a", "target": "b", "port": "in", "score": 1.0}], {})
    result = {"rows": [{"spec": f"ck{i}", "n_edges": 1, "composition": {"head": 0}} for i in range(2)]}
    (tmp_path / "circuits").mkdir()
    for old in ("ckpt2.json", "evolution.png"):  # what a 3-checkpoint run with plots left
        (tmp_path / ("circuits" if old.startswith("ckpt") else ".") / old).write_text("old")
    (tmp_path / "circuits" / "mine.json").write_text("{}")  # a file of the user's stays
    write(result, [c, c], tmp_path, plots=False)
    assert sorted(p.name for p in (tmp_path / "circuits").iterdir()) == ["ckpt0.json", "ckpt1.json", "mine.json"]
    assert not (tmp_path / "evolution.png").exists()
