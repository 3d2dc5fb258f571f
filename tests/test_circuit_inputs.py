"""Facts that no circuit can be found for are refused up front, in one line naming the fact: a corrupted answer that
starts with the answer's token (the logit difference would be 0 in every run, faithfulness NaN), a corrupted prompt
that is the prompt, and a prompt longer than the model's context."""

from __future__ import annotations

import json
import math
import re

import pytest

from helpers import SHORT_CONTEXT, one_error
from workbench.circuits.discover import CircuitOptions, find_circuit
from workbench.circuits.facts import Fact, builtin_facts, prepare, read_facts
from workbench.cli import main
from workbench.errors import WorkbenchError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

OK = {"prompt": "The capital of France is", "answer": " Paris", "corrupted_prompt": "The capital of Spain is",
      "corrupted_answer": " Madrid"}


def _write(path, *facts) -> str:
    path.write_text("".join(json.dumps(f) + "\n" if f else "\n" for f in facts))
    return str(path)


@pytest.mark.filterwarnings("ignore:.* no space before it:UserWarning")  # "Rome" after "... is": read as " Rome"
@pytest.mark.parametrize("answer,corrupted,shared", [(" New Delhi", " New York", " New"), (" Rome", " Rome", " Rome"),
                                                      ("Rome", " Rome", " Rome")])
def test_a_corrupted_answer_that_starts_with_the_answers_token_names_the_line(zoo_tokenizer, tmp_path, answer,
                                                                               corrupted, shared):
    """Facts are scored by their answers' first tokens: " New Delhi" against " New York" is " New" against itself.
    ("Rome" after "... is" reads as " Rome".) The error names the file, the line (blank lines counted), both answers
    and the token."""
    bad = {"prompt": "The capital of India is", "answer": answer, "corrupted_prompt": "The capital of Spain is",
           "corrupted_answer": corrupted}
    path = _write(tmp_path / "facts.jsonl", OK, None, bad)
    facts = read_facts(path)
    with pytest.raises(WorkbenchError) as e:
        prepare(zoo_tokenizer, facts)
    msg = str(e.value)
    assert msg.startswith(f"facts file {path} line 3 ('The capital of India is'): ") and "\n" not in msg
    assert f"{corrupted!r}" in msg and f"same token {shared!r}" in msg
    # without a corrupted prompt (a subject swap builds it) the given corrupted answer is checked all the same
    bare = {"prompt": bad["prompt"], "answer": answer, "corrupted_answer": corrupted}
    with pytest.raises(WorkbenchError, match=f"line 1 .*same token {shared!r}"):
        prepare(zoo_tokenizer, read_facts(_write(tmp_path / "bare.jsonl", bare)))
    # facts made in Python are named by their index
    with pytest.raises(WorkbenchError, match=r"^fact 1 \('The capital of India is'\): .*same token"):
        prepare(zoo_tokenizer, [Fact(**OK), Fact(**bad)])
    assert facts[0] == Fact(**OK) and facts[0].to_dict() == OK  # where a fact was read is no part of it


def test_cli_refuses_a_shared_first_token_before_any_work(tmp_path, capsys):
    facts = _write(tmp_path / "facts.jsonl", {"prompt": "The capital of India is", "answer": " New Delhi",
                                              "corrupted_prompt": "The capital of Spain is",
                                              "corrupted_answer": " New York"})
    code = main(["circuit", "zoo:qwen2-moe", "--facts", facts, "--out", str(tmp_path / "o")])
    one_error(code, capsys.readouterr().err, f"{facts} line 1", "' New Delhi'", "' New York'", "same token ' New'")
    assert not (tmp_path / "o").exists()


def test_a_corrupted_prompt_that_is_the_prompt_is_refused(zoo_tokenizer):
    same = Fact("The capital of France is", " Paris", "The capital of France is", " Berlin")
    with pytest.raises(WorkbenchError, match=r"^fact 0 .*the corrupted prompt is the prompt"):
        prepare(zoo_tokenizer, [same])


def test_chosen_corrupted_answers_never_start_with_the_answers_token(zoo_tokenizer):
    """Where the facts give no corrupted answer, the swap partner's answer is the corrupted one: a partner whose
    answer starts with the same token (" New York" for " New Delhi") is passed over for the next one."""
    facts = [Fact("The capital of India is", " New Delhi", relation="capital", subject="India"),
             Fact("The capital of Iraq is", " New York", relation="capital", subject="Iraq"),  # (wrong, on purpose)
             Fact("The capital of Peru is", " Lima", relation="capital", subject="Peru"), *builtin_facts()]
    prepared = prepare(zoo_tokenizer, facts)
    assert prepared[0].baseline == "swap" and prepared[0].corrupted_prompt == "The capital of Peru is"
    assert prepared[1].corrupted_prompt == "The capital of Peru is"
    assert all(p.corrupted_answer_id != p.answer_id for p in prepared)


# ----- the model's context ------------------------------------------------------------------------------------

CONTEXT = SHORT_CONTEXT  # the conftest's short_gpt2


def _long(country: str, words: int) -> str:
    return "word " * words + f"The capital of {country} is"


def test_a_fact_longer_than_the_context_names_the_fact_and_the_lengths(short_gpt2, zoo_tokenizer, tmp_path, capsys):
    facts = _write(tmp_path / "facts.jsonl", *({"prompt": _long("Italy", 60), "answer": " Rome",
                                                "corrupted_prompt": _long("France", 60), "corrupted_answer": " Paris"}
                                               for _ in range(2)))
    n = len(zoo_tokenizer(_long("Italy", 60)).input_ids)
    code = main(["circuit", str(short_gpt2), "--facts", facts, "--top-edges", "20", "--no-curve",
                 "--out", str(tmp_path / "o")])
    one_error(code, capsys.readouterr().err, f"{facts} line 1", f"{n} tokens", f"context of {CONTEXT}")
    assert not (tmp_path / "o").exists()


def test_a_fact_that_fills_the_context_exactly_runs(short_gpt2, zoo_tokenizer):
    from workbench.models.specs import load

    lm = load(str(short_gpt2))
    words = next(w for w in range(40) if len(zoo_tokenizer(_long("Italy", w)).input_ids) == CONTEXT)
    facts = [Fact(_long("Italy", words), " Rome", _long("France", words), " Paris"),
             Fact("The capital of Japan is", " Tokyo", "The capital of Spain is", " Madrid")]
    circuit, _, _ = find_circuit(lm, facts, CircuitOptions(method="eap", top_edges=20, random_seeds=1))
    assert [f["n_tokens"] for f in circuit.meta["facts"]] == [CONTEXT, 5]
    m = circuit.meta["metrics"]
    assert m["metric_full"] == m["metric_full"] and m["metric_full"] != m["metric_corrupted"]
    with pytest.raises(WorkbenchError, match=rf"^fact 0 .*{CONTEXT + 1} tokens, more than the model's context of "
                                             rf"{CONTEXT}"):
        prepare(lm.tokenizer, [Fact(_long("Italy", words + 1), " Rome")], lm.model)


def test_a_corruption_that_changes_nothing_is_named_not_blamed_on_the_circuits_size(monkeypatch):
    """One one-token fact on the mean baseline: the mean over all clean tokens is that token, so the corrupted run is
    the clean one and faithfulness is 0/0 at every budget. The warning says so instead of "no budget reaches it"."""
    import warnings

    from workbench.circuits import facts as F
    from workbench.models.specs import load

    monkeypatch.setattr(F, "neighbour_swap", lambda *a, **k: None)  # no neighbour: the mean baseline
    lm = load("zoo:qwen2-moe")
    fact = Fact(prompt="hello", answer=" world")
    assert [p.baseline for p in prepare(lm.tokenizer, [fact], lm.model)] == ["mean"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        find_circuit(lm, [fact], CircuitOptions(target_faithfulness=0.85, random_seeds=1))
    said = [str(w.message) for w in seen if "faithfulness" in str(w.message)]
    assert said and all("undefined (NaN) at every budget" in m and "no budget up to" not in m for m in said), said


# ----- circuit files ------------------------------------------------------------------------------------------

def _node(name: str, **attrs) -> dict:
    return {"id": name, "kind": "mlp", "layer": 0, "index": -1, **attrs}


@pytest.mark.parametrize("nodes,edges,needle", [
    ([{"id": "a"}, _node("b")], None, "node 0 (a) has no 'kind'; kinds: input, head, kv, mlp, router, expert, shared"),
    ([_node("a"), {"id": "b", "kind": "mlp", "index": 0}], None, "node 1 (b) has no 'layer'"),
    ([_node("a"), {"id": "b", "kind": "mlp", "layer": 1}], None, "node 1 (b) has no 'index'"),
    ([_node("a", layer="zero"), _node("b")], None, "node 0 (a) has layer 'zero', not an integer"),
    ([_node("a", index=1.5), _node("b")], None, "node 0 (a) has index 1.5, not an integer"),
    ([_node("a", layer=True), _node("b")], None, "node 0 (a) has layer True, not an integer"),
    ([_node("a", tags=["x"]), _node("b")], None, "node 0 (a) has attribute 'tags' = ['x'], not a string, number"),
    ([_node("a"), _node("a")], None, "node 1 repeats the id 'a'"),
    ([_node("a"), _node("b")], [{"source": ["a"], "target": "b", "port": "in", "score": 1.0}],
     "edge 0 has a 'source', 'target' or 'port' that is not a string"),
])
def test_a_circuit_file_without_what_every_circuit_has_names_the_file_and_the_node(tmp_path, capsys, nodes, edges,
                                                                                    needle):
    """Every node ``workbench circuit`` writes has a kind, an integer layer and an integer index (``Node.attrs``),
    and scalar attributes (GraphML carries no others); ``read_json`` (circuit-diff, sae features, the app) refuses a
    file without them in one line naming the file and the first bad node or edge, before any work."""
    from workbench.circuits.export import Circuit, write_json

    good = write_json(Circuit({"a": _node("a"), "b": _node("b")}, [{"source": "a", "target": "b", "port": "in",
                                                                    "score": 1.0}]), tmp_path / "good.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nodes": nodes, "edges": edges or [{"source": "a", "target": "b", "port": "in",
                                                                   "score": 1.0}]}))
    one_error(main(["circuit-diff", str(good), str(bad)]), capsys.readouterr().err,
              f"circuit file {bad}: not a circuit", needle)
    assert main(["circuit-diff", str(good), str(good)]) == 0


def test_a_nan_edge_score_is_read_as_written():
    """``write_json`` allows NaN (a score is NaN where the attribution was); reading keeps it, and the app leaves such
    an edge out of the drawing with a warning (tests/test_ui_circuit_inputs.py)."""

    from workbench.circuits.export import Circuit

    data = {"nodes": [_node("a"), _node("b")],
            "edges": [{"source": "a", "target": "b", "port": "in", "score": math.nan}]}
    c = Circuit.from_json_obj(json.loads(json.dumps(data)))
    assert math.isnan(c.edges[0]["score"])
    back = Circuit.from_json_obj(c.to_json_obj())
    assert back.nodes == c.nodes and math.isnan(back.edges[0]["score"])


def test_nan_scores_and_odd_graph_summaries_still_export(tmp_path):
    """A NaN edge is drawn dashed in DOT (no ``penwidth=nan``, and it does not set the width scale); an SVG of a
    file whose graph summary is not a mapping is drawn with one head per KV group."""

    from workbench.circuits.export import Circuit, write_dot
    from workbench.circuits.render import circuit_svg

    c = Circuit.from_json_obj({"nodes": [_node("a"), _node("b"), _node("c")],
                               "edges": [{"source": "a", "target": "b", "port": "in", "score": math.nan},
                                         {"source": "b", "target": "c", "port": "in", "score": 2.0}],
                               "graph": {"meta": {"graph": ["not", "a", "summary"]}}})
    dot = write_dot(c, tmp_path / "c.dot").read_text()
    assert "nan," not in dot and 'label="in nan", style=dashed' in dot and "penwidth=3.50" in dot
    svg = circuit_svg(c)
    assert svg.rstrip().endswith("</svg>") and 'id="edge-0"' in svg and 'id="edge-1"' not in svg  # the finite one


def test_the_curve_line_keeps_small_budgets_apart():
    from workbench.circuits.cli import curve_line

    curve = [{"fraction": n / 1485, "faithfulness": f} for n, f in ((1, 0.1), (2, 0.2), (14, 0.5), (297, 0.9))]
    assert curve_line(curve) == "faithfulness curve: 0.067% 0.10, 0.13% 0.20, 0.94% 0.50, 20% 0.90"


def test_repeated_facts_are_said():
    """A 200-line file of 48 distinct facts ran as 200 without a word (the lost-fact list named one fact three
    times); repeats are kept, with a warning naming the first."""
    from workbench.circuits.facts import parse_facts

    line = '{"prompt": "The capital of Japan is", "answer": " Tokyo"}'
    other = '{"prompt": "The capital of Italy is", "answer": " Rome"}'
    with pytest.warns(UserWarning, match=r"facts: 2 fact\(s\) repeat an earlier one's prompt and answer \(facts line 3 "
                                         r"repeats facts line 1\)"):
        assert len(parse_facts([line, other, line, line])) == 4


# ----- circuits that say what they are --------------------------------------------------------------------------

def test_gap_z_is_the_mean_gap_over_its_standard_error():

    import torch

    from workbench.circuits.evaluate import gap_z

    gaps = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mean, sd = 3.0, math.sqrt(sum((g - 3.0) ** 2 for g in (1, 2, 3, 6)) / 3)
    assert gap_z(gaps) == pytest.approx(mean / (sd / 2))
    assert gap_z(torch.tensor([0.0, 0.0])) == 0.0 and math.isnan(gap_z(torch.tensor([5.0])))
    # Two facts swapped with each other have one gap between them (to rounding): it was counted twice, and its spread
    # of rounding noise gave gap_z 1.15e7 (or inf) on a plain relation of two facts. Distinct gaps count once.
    assert math.isnan(gap_z(torch.tensor([-2.0, -2.0]))) and math.isnan(gap_z(torch.tensor([3.25, 3.2500002])))
    assert gap_z(torch.tensor([1.0, 2.0, 2.0000001, 3.0, 6.0, 6.0])) == pytest.approx(mean / (sd / 2))


@pytest.fixture(scope="module")
def zoo_lm():
    from workbench.models.specs import load

    return load("zoo:qwen2-moe")


def test_a_gap_within_the_facts_spread_is_said_with_the_faithfulness_it_makes(zoo_lm):
    """On the random-weight zoo model the corruption moves the logit difference by +0.014 over 12 facts whose own gaps
    scatter around it (gap_z 0.75): the circuit's faithfulness (1.57 there) is a ratio over noise, and is flagged.
    (On SmolLM2 the same facts give a gap of 16 logits, gap_z 13.8: no warning.)"""
    from workbench.circuits.facts import builtin_facts

    with pytest.warns(UserWarning, match=r"the corruption moves the answer's logit difference by .* less than twice "
                                         r"its standard error over the facts \(gap_z 0\.\d\d\): faithfulness, a ratio "
                                         r"over that gap, is noise here"):
        c, _, _ = find_circuit(zoo_lm, builtin_facts()[:12], CircuitOptions(method="eap", top_edges=20,
                                                                            random_seeds=0, per_relation=False))
    assert c.meta["metrics"]["gap_z"] < 2


@pytest.mark.filterwarnings("ignore:the corruption moves")
def test_an_empty_circuit_is_said_naming_the_largest_score_and_the_cli_writes_none(zoo_lm, tmp_path, capsys):
    """`--threshold 1e9` wrote a circuit of 0 edges (and its evaluation) without a word."""
    with pytest.warns(UserWarning, match=r"^the circuit is empty: no edge reaches --threshold 1e\+09 \(the largest "
                                         r"\|score\| is \d"):
        c, _, _ = find_circuit(zoo_lm, builtin_facts_few(), CircuitOptions(method="eap", threshold=1e9,
                                                                           random_seeds=0, per_relation=False))
    assert c.n_edges == 0 and c.meta["selection"]["empty"]
    facts = tmp_path / "f.jsonl"
    facts.write_text("".join(json.dumps({"prompt": f.prompt, "answer": f.answer}) + "\n" for f in builtin_facts_few()))
    code = main(["circuit", "zoo:qwen2-moe", "--facts", str(facts), "--threshold", "1e9", "--method", "eap",
                 "--random-seeds", "0", "--out", str(tmp_path / "out"), "--quiet"])
    msg = one_error(code, capsys.readouterr().err, "nothing written")
    assert msg.startswith("error: the circuit is empty: no edge reaches --threshold 1e+09")
    assert not (tmp_path / "out" / "circuit.json").exists()


@pytest.mark.filterwarnings("ignore:the corruption moves")
def test_a_refine_whose_candidates_are_every_edge_is_said(zoo_lm):
    from workbench.circuits.graph import build_graph

    total = build_graph(zoo_lm.model, zoo_lm.adapter).n_edges
    n = total // 2 + 1
    with pytest.warns(UserWarning, match=rf"--refine 2: its 2 x {n} candidates would be every one of the {total} "
                                         "edges, so there is nothing to re-score within"):
        c, _, _ = find_circuit(zoo_lm, builtin_facts_few(), CircuitOptions(method="eap", top_edges=n, refine=2,
                                                                           random_seeds=0, per_relation=False,
                                                                           evaluate=False))
    assert c.meta["selection"]["refine"]["skipped"]


def test_a_circuit_short_of_its_budget_says_why():
    from workbench.circuits.cli import _short_line

    assert _short_line({"rule": "top", "top_edges": 30, "selected": 30, "after_pruning": 4}) == (
        "; budget 30: 30 selected, 4 of them on input->logits paths")
    assert "would have gone over it" in _short_line({"rule": "fill", "top_edges": 30, "selected": 27,
                                                     "after_pruning": 27})
    assert _short_line({"rule": "fill", "top_edges": 30, "selected": 30, "after_pruning": 30}) == ""
    assert _short_line({"rule": "threshold", "threshold": 0.1, "selected": 3, "after_pruning": 2}) == ""


def builtin_facts_few():
    from workbench.circuits.facts import builtin_facts

    return builtin_facts()[:4]


def test_an_answer_whose_first_token_is_whitespace_is_said(zoo_tokenizer):
    """'  Paris' (two spaces) after '... is' was scored on a lone-space token without a word."""
    facts = [Fact("The capital of France is", "  Paris"), Fact("The capital of Italy is", " Rome")]
    with pytest.warns(UserWarning, match=r"1 of 2 facts have an answer whose first token is whitespace only \(e\.g\. "
                                         r"'  Paris' after 'The capital of France is'"):
        prepare(zoo_tokenizer, facts)


def test_an_answer_or_corrupted_answer_starting_with_punctuation_or_whitespace_is_said(zoo_tokenizer):
    """' "Paris"' was scored on its quote token, and a given corrupted answer '  Tokyo' on a lone space, unsaid."""
    quoted = [Fact("The capital of France is", ' "Paris"'), Fact("The capital of Italy is", " Rome")]
    with pytest.warns(UserWarning, match=r"^1 answer\(s\) or corrupted answer\(s\) start with a token of no letter or "
                                         r"digit \(e\.g\. ' \"Paris\"' of fact 0 \('The capital of France is'\): "
                                         r"' \"'\)"):
        prepare(zoo_tokenizer, quoted)
    spaced = [Fact("The capital of France is", " Paris", corrupted_prompt="The capital of Japan is",
                   corrupted_answer="  Tokyo")]
    with pytest.warns(UserWarning, match=r"^1 answer\(s\) or corrupted answer\(s\) .* '  Tokyo' of fact 0"):
        prepare(zoo_tokenizer, spaced)


@pytest.mark.filterwarnings("ignore:the corruption moves")
def test_api_options_are_checked_as_the_flags_are_and_a_budget_past_the_graph_is_said(zoo_lm):
    """``top_edges="10"`` raised a TypeError from a comparison, 2.5 was cut to 2, a negative threshold and a target of
    -3 or NaN were taken; ``top_edges`` past the graph's edges was recorded as a budget that pruning fell short of."""
    facts = builtin_facts_few()
    for kw, msg in ((dict(top_edges="10"), "top_edges must be an integer >= 1, got '10'"),
                    (dict(top_edges=2.5), "top_edges must be an integer >= 1, got 2.5"),
                    (dict(threshold=-1.0), "threshold must be a number >= 0, got -1.0"),
                    (dict(target_faithfulness=-3.0), r"target_faithfulness must be a number in \[0, 1\], got -3.0"),
                    (dict(target_faithfulness=math.nan), r"target_faithfulness must be a number in \[0, 1\], got nan")):
        with pytest.raises(WorkbenchError, match=f"^{msg}$"):
            find_circuit(zoo_lm, facts, CircuitOptions(random_seeds=0, **kw))
    with pytest.warns(UserWarning, match=r"^--top-edges 1000000000 is more than the graph's (\d+) edges: the budget is "
                                         "all of them$"):
        c, _, _ = find_circuit(zoo_lm, facts, CircuitOptions(method="eap", top_edges=10 ** 9, random_seeds=0,
                                                             per_relation=False))
    sel = c.meta["selection"]
    assert sel["top_edges"] == c.meta["n_edges_total"] == sel["after_pruning"] and sel["top_edges_asked"] == 10 ** 9


@pytest.mark.filterwarnings("ignore:the corruption moves")
def test_one_fact_and_repeated_facts_are_said(zoo_lm):
    """One fact has no spread to judge its gap by (gap_z NaN) and a fact given three times made gap_z infinite: both
    passed without the warning a noisy gap gets."""
    one = [Fact("The capital of France is", " Paris", corrupted_prompt="The capital of Japan is")]
    with pytest.warns(UserWarning, match=r"^one fact: its faithfulness \(.*\) has no spread over facts"):
        c, _, _ = find_circuit(zoo_lm, one, CircuitOptions(method="eap", top_edges=20, random_seeds=0))
    assert math.isnan(c.meta["metrics"]["gap_z"])
    with pytest.warns(UserWarning, match=r"^2 fact\(s\) repeat an earlier one's prompt and answer \(first: fact 1, as "
                                         r"fact 0\)"):
        find_circuit(zoo_lm, one * 3, CircuitOptions(method="eap", top_edges=20, random_seeds=0))
    pair = [Fact("The capital of France is", " Paris", relation="capital", subject="France"),
             Fact("The capital of Japan is", " Tokyo", relation="capital", subject="Japan")]  # swapped with each other
    with pytest.warns(UserWarning, match=r"^2 facts with one gap between them \(two facts swapped with each other have "
                                         r"the same one\): their faithfulness"):
        c, _, _ = find_circuit(zoo_lm, pair, CircuitOptions(method="eap", top_edges=20, random_seeds=0))
    assert math.isnan(c.meta["metrics"]["gap_z"])  # it was ~1e7: the same gap twice, spread by rounding


@pytest.mark.filterwarnings("ignore:the corruption moves")
def test_cli_names_no_curve_as_what_took_the_target_and_prints_no_random_control_it_has_not(tmp_path, capsys):
    """`--no-curve --max-fraction 0.1` said "give it without --top-edges or --threshold", flags not given; with
    `--random-seeds 0` the summary printed "random nan"."""
    facts = tmp_path / "f.jsonl"
    facts.write_text("".join(json.dumps({"prompt": f.prompt, "answer": f.answer}) + "\n" for f in builtin_facts_few()))
    base = ["circuit", "zoo:qwen2-moe", "--facts", str(facts), "--quiet"]
    for flag in (["--max-fraction", "0.1"], ["--target-hit-share", "0.5"]):
        code = main([*base, "--no-curve", *flag, "--out", str(tmp_path / "x")])
        msg = one_error(code, capsys.readouterr().err, f"{flag[0]} ")
        assert msg.endswith("give it without --no-curve"), msg
    assert main([*base, "--method", "eap", "--top-edges", "20", "--random-seeds", "0",
                 "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "faithfulness " in out and "random" not in out and "nan" not in out, out


def test_a_half_precision_model_is_read_as_its_blocks_and_refused_for_what_it_is():
    """A bf16 / fp16 model was refused as "cannot read layer 1 ... as a residual block": the block matcher cast to
    float32 before choosing its tolerance, so half precision met float32's. The layouts are now those of float32, and
    the circuit says what it needs (float32); sae features (which read the same layouts) no longer fall back."""
    import torch

    from workbench.circuits.blocks import block_layouts
    from workbench.models.specs import load

    want = [b.kind for b in block_layouts(load("zoo:qwen3-moe").model, load("zoo:qwen3-moe").adapter)[0]]
    for dtype in ("bfloat16", "float16"):
        lm = load("zoo:qwen3-moe", dtype=dtype)
        assert next(lm.model.parameters()).dtype == getattr(torch, dtype)
        assert [b.kind for b in block_layouts(lm.model, lm.adapter)[0]] == want
        with pytest.raises(WorkbenchError, match=rf"circuits run in fp32; the model is torch.{dtype}"):
            find_circuit(lm, builtin_facts()[:4], CircuitOptions(method="eap", top_edges=10))


def test_options_of_the_wrong_kind_are_refused_before_any_model_work(zoo_lm):
    """A notebook's evaluate="no" still evaluated (any truthy value was True), swaps=1.5 failed in range() after the
    attribution had run, and "3" for refine, swaps or the shares failed in a comparison."""
    facts = builtin_facts()[:4]
    cases = [(dict(evaluate="no"), "evaluate must be True or False, got 'no'"),
             (dict(curve=1), "curve must be True or False, got 1"),
             (dict(per_relation="yes"), "per_relation must be True or False"),
             (dict(lean="no"), "lean must be True or False"),
             (dict(swaps=1.5), "swaps must be an integer, got 1.5"),
             (dict(refine="3"), "refine must be an integer, got '3'"),
             (dict(target_hit_share="0.8"), "target_hit_share must be a number, got '0.8'"),
             (dict(max_fraction=None), "max_fraction must be a number, got None"),
             (dict(max_memory="16"), "max_memory must be a number, got '16'")]
    for kw, msg in cases:
        with pytest.raises(WorkbenchError, match=f"^{re.escape(msg)}"):
            find_circuit(zoo_lm, facts, CircuitOptions(method="eap", top_edges=10, **kw))


def test_a_facts_fields_are_checked_as_a_files_are(zoo_lm):
    """read_facts checks a file's fields; a Fact built in a notebook was not checked (corrupted_prompt=5 failed in the
    tokenizer, answer=None in an attribute lookup)."""
    good = builtin_facts()[:3]
    cases = [(Fact("The capital of France is", " Paris", corrupted_prompt=5), "'corrupted_prompt' must be a non-empty "
              "string, got 5"),
             (Fact("The capital of France is", None), "fact 3: 'answer' must be a non-empty string, got None"),
             (Fact(5, " Paris"), "'prompt' must be a non-empty string, got 5"),
             (Fact("The capital of France is", " Paris", subject="Spain"), "subject 'Spain' does not occur")]
    for bad, msg in cases:
        with pytest.raises(WorkbenchError, match=re.escape(msg)):
            find_circuit(zoo_lm, good + [bad], CircuitOptions(method="eap", top_edges=10))
