"""Study inputs: saved conditions reused only for the same run, fields checked when read, scopes that touch
nothing refused, texts longer than the model's context cut to it."""

import json
import math
import re
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch
import yaml

from helpers import SHORT_CONTEXT
from workbench.errors import WorkbenchError
from workbench.interventions import Intervention
from workbench.models.specs import load
from workbench.studies import Study, summarise

TINY = {"name": "ok", "metrics": ["perplexity", "kl"], "num_texts": 4,
        "conditions": [{"name": "drop-L1-E3", "interventions": [{"op": "drop", "layers": 1, "expert": 3}]}]}


@pytest.fixture(scope="module")
def qwen2():
    return load("zoo:qwen2-moe")


@pytest.fixture(scope="module")
def mixtral():
    return load("zoo:mixtral")


def _run(spec, lm, out):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        df = Study(spec).run(lm, out, progress=False)
    return df.drop(columns="seconds"), [str(w.message) for w in seen]


# ----- saved conditions: reused only for the same model, texts and settings ----------------------------------------

def test_saved_conditions_of_another_model_or_other_texts_are_recomputed(qwen2, mixtral, tmp_path):
    out = tmp_path / "a6"
    _run(TINY, qwen2, out)
    df, said = _run(TINY, mixtral, out)
    fresh, _ = _run(TINY, mixtral, tmp_path / "fresh")
    pd.testing.assert_frame_equal(df, fresh)
    assert [m for m in said if "computed for another run" in m] == [
        "conditions/baseline.json and 1 more were computed for another run (model 'zoo:qwen2-moe', now "
        "'zoo:mixtral'): recomputing"]
    fewer = dict(TINY, num_texts=2)
    df, said = _run(fewer, mixtral, out)
    fresh, _ = _run(fewer, mixtral, tmp_path / "fresh2")
    pd.testing.assert_frame_equal(df, fresh)
    assert (df.n == 2).all() and (pd.read_csv(out / "results.csv").n == 2).all()
    assert any("(texts 4, now 2)" in m for m in said)


def test_saved_conditions_of_this_run_are_reused_and_old_records_recomputed(qwen2, tmp_path):
    out = tmp_path / "o"
    first, _ = _run(TINY, qwen2, out)
    saved = out / "conditions" / "drop-L1-E3.json"
    done = json.loads(saved.read_text())
    done["rows"][0].update(mean=1234.5, ci_low=1234.5, ci_high=1234.5)  # a mark: reused rows are read back as saved
    saved.write_text(json.dumps(done))
    again, said = _run(TINY, qwen2, out)
    assert again[again.condition == "drop-L1-E3"]["mean"].iloc[0] == 1234.5
    assert not [m for m in said if "another run" in m]
    done["inputs"]["device"] = "cuda"  # computed on a GPU: other kernels, numbers that differ by rounding
    saved.write_text(json.dumps(done))
    again, said = _run(TINY, qwen2, out)
    pd.testing.assert_frame_equal(again, first)
    assert any("drop-L1-E3.json was computed for another run (device 'cuda', now 'cpu')" in m for m in said), said
    del done["inputs"]  # as an older version saved it: no record of what it was computed on
    saved.write_text(json.dumps(done))
    again, said = _run(TINY, qwen2, out)
    pd.testing.assert_frame_equal(again, first)
    assert any("drop-L1-E3.json was computed for another run (no record" in m for m in said)


# ----- fields checked when the study is read ------------------------------------------------------------------------

BAD_FIELDS = [
    ({"num_texts": 0}, "field 'num_texts' must be an integer >= 1, got 0"),
    ({"num_texts": -3}, "field 'num_texts' must be an integer >= 1, got -3"),
    ({"num_texts": 2.5}, "field 'num_texts' must be an integer >= 1, got 2.5"),
    ({"num_texts": "abc"}, "field 'num_texts' must be an integer >= 1, got 'abc'"),
    ({"num_texts": True}, "field 'num_texts' must be an integer >= 1, got True"),
    ({"batch_size": 0}, "field 'batch_size' must be an integer >= 1"),
    ({"max_new_tokens": -1}, "field 'max_new_tokens' must be an integer >= 1"),
    ({"seeds": 3}, "field 'seeds' must be a list of integers, e.g. [0, 1, 2], got 3"),
    ({"seeds": [0, "x"]}, "field 'seeds' must be a list of integers"),
    ({"seeds": [1, 1]}, "field 'seeds': seed 1 is listed twice"),
    ({"metrics": ["perplexity", "kl", "perplexity"]}, "field 'metrics': 'perplexity' is listed twice"),
    ({"generation_prompts": "Hello"}, "field 'generation_prompts' must be a list of non-empty strings"),
    ({"generation_prompts": ["Hi", " "]}, "field 'generation_prompts' must be a list of non-empty strings"),
    ({"generation_prompts": [], "metrics": ["generations"]}, "at least one for metric 'generations'"),
    ({"texts": 5}, "field 'texts' must be the path of a text file"),
    ({"texts": ["a", ""]}, "field 'texts' must be the path of a text file (one text a line) or a list"),
    ({"metrics": []}, "field 'metrics' must be a list of metric names"),
    ({"conditions": [{"name": "a", "seed": "x"}]}, "conditions[0]: field 'seed' must be an integer"),
    ({"conditions": [{"generate": "random_experts", "k": 0}]}, "conditions[0]: field 'k' must be an integer >= 1"),
    ({"conditions": [{"generate": "random_experts", "layers": "1"}]}, "field 'layers' must be an integer or a list"),
]


@pytest.mark.parametrize("change,msg", BAD_FIELDS)
def test_bad_top_level_fields_fail_when_read(change, msg):
    with pytest.raises(WorkbenchError, match="^study: .*" + re.escape(msg)):
        Study(dict(TINY, **change))


def test_a_field_error_names_its_line(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: s\nmetrics: [perplexity]\nnum_texts: 0\nconditions: []\n")
    with pytest.raises(WorkbenchError, match=f"^{f} line 3: field 'num_texts'"):
        Study.from_file(f)


@pytest.mark.parametrize("names,msg", [
    (["baseline"], "condition name 'baseline' is used twice (baseline is implicit)"),
    (["a", "a"], "condition name 'a' is used twice"),
    (["baseline "], "'baseline ' and 'baseline' would share the file conditions/baseline.json"),
    (["Baseline"], "'Baseline' and 'baseline' would share the file conditions/Baseline.json"),
    (["drop a", "drop_a"], "'drop_a' and 'drop a' would share the file conditions/drop_a.json"),
])
def test_condition_names_that_would_share_a_file_are_refused(names, msg):
    """Each condition is saved as conditions/<name>.json: two names that map to one file (or to the baseline's, or
    to one on a case-insensitive file system) would overwrite each other's rows."""
    iv = [{"op": "zero", "layers": 1, "expert": 3}]
    with pytest.raises(WorkbenchError, match=re.escape(msg)):
        Study({**TINY, "conditions": [{"name": n, "interventions": iv} for n in names]}, "s.yaml")
    Study({**TINY, "conditions": [{"name": n, "interventions": iv} for n in ("drop a", "drop b")]}, "s.yaml")


def test_unusual_but_valid_fields_work():
    s = Study(dict(TINY, metrics="perplexity", seeds=[], generation_prompts=[], texts=["One text.", "Two."]))
    assert s.metrics == ["perplexity"] and s.seeds == [] and s.generation_prompts == []
    assert s.texts() == ["One text.", "Two."]


# ----- interventions: required factors, finite numbers, scopes that touch something ---------------------------------

def test_scale_ops_need_a_factor_and_write_it_back():
    for op, where in (("scale", dict(expert=1)), ("scale_channel", dict(channel=1)), ("scale_neuron", dict(channel=1)),
                      ("scale_head", dict(heads=[0]))):
        with pytest.raises(WorkbenchError, match=f"op '{op}' needs field 'factor'"):
            Intervention.from_dict(dict(op=op, layers=1, **where))
        iv = Intervention.from_dict(dict(op=op, layers=1, factor=0, **where))
        assert iv.to_dict()["factor"] == 0 and Intervention.from_dict(iv.to_dict()) == iv
    # study.resolved.yaml spells the factor out, and reads back the same
    spec = {"conditions": [{"name": "s", "interventions": [{"op": "scale", "layers": 1, "expert": 1, "factor": 0.0}]}]}
    dumped = yaml.safe_dump({"conditions": [c.to_dict() for c in Study(spec).explicit]})
    assert "factor: 0.0" in dumped
    assert [c.to_dict() for c in Study(yaml.safe_load(dumped)).explicit] == [c.to_dict() for c in Study(spec).explicit]


@pytest.mark.parametrize("field,value", [("factor", math.nan), ("factor", math.inf), ("weight", -math.inf),
                                         ("value", math.nan), ("factor", True), ("weight", "1")])
def test_numbers_must_be_finite(field, value):
    op = {"factor": "scale", "weight": "force", "value": "bias"}[field]
    with pytest.raises(WorkbenchError, match=f"field '{field}' must be a finite number"):
        Intervention.from_dict({"op": op, "layers": 1, "expert": 1, "factor": 1.0, field: value})


@pytest.mark.parametrize("iv,metrics,msg", [
    ({"prompts": [99]}, ["perplexity", "kl"], "condition 'c' intervention 0: field 'prompts': text 99 out of range "
                                              "(the study has 4 texts)"),
    ({"prompts": [-1]}, ["perplexity"], "field 'prompts': text -1 out of range"),
    ({"prompts": [0]}, ["accuracy"], "field 'prompts' picks texts, which only the metrics"),
    ({"positions": [1000]}, ["perplexity", "kl"], "field 'positions': [1000] touch no token"),
    ({"positions": [-1000]}, ["perplexity"], "field 'positions': [-1000] touch no token"),
])
def test_scopes_that_touch_nothing_fail_before_anything_is_written(qwen2, tmp_path, iv, metrics, msg):
    spec = dict(TINY, metrics=metrics, conditions=[
        {"name": "c", "interventions": [{"op": "zero", "layers": 1, "expert": 3, **iv}]}])
    with pytest.raises(WorkbenchError, match=re.escape(msg)):
        Study(spec).run(qwen2, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("metrics", [["perplexity"], ["accuracy"]])
def test_a_token_scope_in_no_input_is_flagged(qwen2, metrics):
    """A ``token`` the study's inputs never hold (its texts, or the cloze prompts and options) leaves the condition
    equal to the baseline: said when the study is resolved; a token they hold is not flagged."""
    def resolve(token):
        spec = dict(TINY, metrics=metrics, conditions=[
            {"name": "c", "interventions": [{"op": "zero", "layers": 1, "expert": 3, "token": token}]}])
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            Study(spec, "s.yaml").resolve(qwen2)
        return [str(w.message) for w in seen]
    assert any("field 'token': 'zzqqxx' is in none of the study's inputs" in m for m in resolve("zzqqxx"))
    assert not any("field 'token'" in m for m in resolve("capital"))


def test_scopes_that_touch_some_text_run(qwen2):
    spec = dict(TINY, conditions=[{"name": "c", "interventions": [
        {"op": "zero", "layers": 1, "expert": 3, "prompts": [3], "positions": [2, -1000]}]}])
    assert [c.name for c in Study(spec).resolve(qwen2)] == ["baseline", "c"]


# ----- texts longer than the model's context ------------------------------------------------------------------------

CONTEXT = SHORT_CONTEXT  # the conftest's short_gpt2


def test_texts_longer_than_the_context_are_cut_with_one_warning(short_gpt2, zoo_tokenizer, tmp_path):
    long = " ".join(f"word{i}" for i in range(100))
    (tmp_path / "texts.txt").write_text(long + "\nA short text.\n")
    spec = {"name": "long", "texts": str(tmp_path / "texts.txt"), "max_new_tokens": 8,
            "metrics": ["perplexity", "kl", "massive", "sink", "accuracy", "generations", "passkey"],
            "generation_prompts": [long, "Hello there"],
            "conditions": [{"name": "z", "interventions": [{"op": "zero_channel", "layers": 0, "channel": 3}]}]}
    lm = load(str(short_gpt2))
    df, said = _run(spec, lm, tmp_path / "o")
    cut = [m for m in said if "longer than the model's context" in m]
    assert len(cut) == 1, said
    assert f"context of {CONTEXT} positions" in cut[0] and f"1 of 2 texts to {CONTEXT} tokens" in cut[0]
    assert f"1 of 2 generation prompts to {CONTEXT - 8} tokens" in cut[0] and "12 of 12 passkey prompts" in cut[0]
    num = df[df.metric != "generations"]
    assert num["mean"].map(math.isfinite).all() and (num[num.metric == "perplexity"].n == 2).all()
    # the long text's perplexity is that of its first 32 tokens
    ids = torch.tensor(zoo_tokenizer(long).input_ids[:CONTEXT])
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(ids[None]).logits[0, :-1].float(), -1)
    ppl = float(torch.exp(-lp.gather(1, ids[1:, None]).mean()))
    base = df[(df.condition == "baseline") & (df.metric == "perplexity")]["mean"].iloc[0]
    assert base == pytest.approx((ppl + _short_ppl(lm, zoo_tokenizer)) / 2, rel=1e-5)
    with pytest.raises(WorkbenchError, match=f"field 'max_new_tokens': {CONTEXT} new tokens leave no room"):
        Study(dict(spec, max_new_tokens=CONTEXT)).run(lm, tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


def _short_ppl(lm, tok) -> float:
    ids = torch.tensor(tok("A short text.").input_ids)
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(ids[None]).logits[0, :-1].float(), -1)
    return float(torch.exp(-lp.gather(1, ids[1:, None]).mean()))


def test_ablate_cuts_a_long_text_from_the_command_line(short_gpt2, tmp_path):
    (tmp_path / "texts.txt").write_text(" ".join(["word"] * 100) + "\n")
    (tmp_path / "s.yaml").write_text(f"name: long\ntexts: {tmp_path / 'texts.txt'}\nmetrics: [perplexity]\n"
                                     "conditions: []\n")
    r = subprocess.run([sys.executable, "-m", "workbench", "ablate", str(short_gpt2), "--study",
                        str(tmp_path / "s.yaml"), "--quiet", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("warning:") and "context" in x]
    assert lines == [f"warning: {tmp_path / 's.yaml'}: longer than the model's context of {CONTEXT} positions, cut: "
                     f"1 of 1 texts to {CONTEXT} tokens"], r.stderr
    assert (tmp_path / "o" / "results.csv").is_file()


def test_a_texts_file_is_used_whole_unless_num_texts_says_otherwise(tmp_path):
    """A study's own texts were cut to the built-in default's 48 without a word; now all of them run, and
    ``num_texts`` still picks the first N (of the file, or of the built-in texts, 48 by default)."""
    f = tmp_path / "texts.txt"
    f.write_text("".join(f"Text number {i} is here.\n" for i in range(60)))
    bare = {k: v for k, v in TINY.items() if k != "num_texts"}
    assert len(Study({**bare, "texts": str(f)}, "s.yaml").texts()) == 60
    assert len(Study({**bare, "texts": [f"Text {i}." for i in range(50)]}, "s.yaml").texts()) == 50
    assert len(Study({**bare, "texts": str(f), "num_texts": 5}, "s.yaml").texts()) == 5
    assert len(Study(bare, "s.yaml").texts()) == 48


@pytest.fixture(scope="module")
def shared_super():
    """zoo:qwen2-moe with a planted super expert in layer 1's shared expert (channel 17)."""
    lm = load("zoo:qwen2-moe")
    with torch.no_grad():
        lm.adapter.decoder_layers(lm.model)[1].mlp.shared_expert.down_proj.weight[17] *= 300.0
    return lm


def _resolve(spec, lm):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        conds = Study({"num_texts": 8, "metrics": ["perplexity"], "seeds": [0], **spec}).resolve(lm)
    return {c.name: [iv.to_dict() for iv in c.interventions] for c in conds[1:]}, [str(w.message) for w in seen]


def test_drop_of_a_shared_super_expert_zeroes_it_and_says_so(shared_super):
    """A generated drop of a shared super expert once dropped the routed expert of the same number (named
    'super L1.S0', it equalled dropping L1.R0); a shared expert is never routed, so it is zeroed, with a warning."""
    conds, said = _resolve({"conditions": [{"generate": "each_super_expert", "op": "drop"}]}, shared_super)
    assert conds["super L1.S0 drop"] == [{"op": "zero", "layers": [1], "expert": 0, "kind": "shared"}]
    assert any("L1.S0: a shared expert is never routed, so it is zeroed" in w for w in said), said


def test_generators_take_layers_and_name_what_they_generate(shared_super):
    """Generators' names once left out their layers and op (two random controls of other layers were one name,
    refused after the profile), k beyond the experts was cut without a word, and layers did nothing to the super
    expert generators."""
    conds, said = _resolve({"conditions": [
        {"generate": "random_experts", "k": 1, "layers": 1}, {"generate": "random_experts", "k": 1, "layers": [2]},
        {"generate": "random_experts", "k": 50, "layers": 3},
        {"generate": "all_super_experts", "layers": [2, 3]}, {"generate": "each_super_expert", "layers": 1}]},
        shared_super)
    # two random controls in other layers were refused as one name ('random x1 seed 0') after the profile
    assert list(conds) == ["random x1 in L1 seed 0", "random x1 in L2 seed 0", "random x8 in L3 seed 0",
                           "super L1.S0"]  # no super expert in layers 2 and 3: all_super_experts generates nothing
    assert len(conds["random x8 in L3 seed 0"]) == 8  # k=50 of 8 experts: all 8, said, and named so
    assert any("k=50, but layers [3] have 8 experts" in w for w in said), said
    assert any("no super expert in layers [2, 3]: no condition" in w for w in said), said


@pytest.mark.parametrize("conds,msg", [
    ([{"generate": "random_experts", "k": 1}, {"generate": "random_experts", "k": 1, "op": "zero"}],
     "conditions[1]: generates what conditions[0] generates"),
    ([{"generate": "random_experts", "k": 1, "op": "drop"}, {"generate": "random_experts", "k": 1, "op": "drop",
                                                              "layers": [1, 1]}, {"generate": "random_experts",
                                                                                   "k": 1, "op": "drop", "layers": 1}],
     "conditions[2]: generates what conditions[1] generates"),
    ([{"generate": "each_super_expert", "k": 2}], "field 'k' is random_experts'"),
    ([{"name": "a", "interventions": {"op": "zero", "layers": 1, "expert": 1}}],
     "conditions[0]: field 'interventions' must be a list of interventions"),
    ([{"name": None, "interventions": []}], "conditions[0]: field 'name' is required (a non-empty name), got None"),
    ([{"name": " ", "interventions": []}], "field 'name' is required"),
])
def test_generators_and_conditions_that_cannot_mean_what_they_say_are_refused_when_read(conds, msg):
    with pytest.raises(WorkbenchError) as e:
        Study({"conditions": conds})
    assert msg in str(e.value)


def test_a_relative_texts_path_is_read_beside_the_study_file(tmp_path, monkeypatch):
    """It was read from the current folder: a study beside its texts failed when run from elsewhere, and so did
    its study.resolved.yaml."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.txt").write_text("one text\nanother text\n")
    (tmp_path / "sub" / "s.yaml").write_text("metrics: [perplexity]\ntexts: t.txt\nconditions: []\n")
    monkeypatch.chdir(tmp_path)
    study = Study.from_file("sub/s.yaml")
    assert study.texts() == ["one text", "another text"] and study.texts_file == str(tmp_path / "sub" / "t.txt")
    (tmp_path / "t2.txt").write_text("from the current folder\n")  # still found there when not beside the study
    (tmp_path / "sub" / "s2.yaml").write_text("texts: t2.txt\nconditions: []\n")
    assert Study.from_file("sub/s2.yaml").texts() == ["from the current folder"]


def test_a_condition_whose_outputs_are_not_finite_is_said_and_not_scored_right(tmp_path):
    """A channel scaled by 1e38 makes the outputs NaN: cloze accuracy read 1.00 (max over NaN log-probabilities
    returned the first option, the right one for a quarter of the items), without a word, and the report then
    failed (argmax over NaN changes). The NaN items are left out, said, and the report renders."""
    from workbench.report import report

    lm = load("zoo:qwen3-moe")
    huge = [{"op": "scale_channel", "layers": layer, "channel": 3, "factor": 1e38} for layer in (0, 1)]
    study = Study({"name": "s", "num_texts": 4, "metrics": ["perplexity", "accuracy"],
                   "conditions": [{"name": "huge", "interventions": huge}]})
    with pytest.warns(UserWarning, match=r"condition 'huge': perplexity is not finite on 4 of 4, accuracy is not "
                                         r"finite on 24 of 24 \(the model's outputs are not finite there\)"):
        df = study.run(lm, tmp_path / "o", progress=False)
    huge_rows = df[df.condition == "huge"].set_index("metric")
    assert huge_rows.loc["accuracy", "n"] == 0 and math.isnan(huge_rows.loc["accuracy", "mean"])
    assert "huge" in summarise(df).index  # the CLI's table kept only the baseline
    assert report(tmp_path / "o").exists()


def test_an_infinite_metric_value_is_said_too():
    """An fp16 overflow's `massive` is inf: left out of the mean (n=3 of 4) but not named; the NaN metrics were."""
    from workbench.studies import _say_not_finite

    with pytest.warns(UserWarning, match=r"condition 'c': massive is not finite on 1 of 4 \(the model's outputs"):
        _say_not_finite("c", {"massive": [1.0, math.inf, 2.0, 3.0], "perplexity": [1.0, 2.0, 3.0, 4.0]})


def test_a_number_yaml_reads_as_text_is_said_so():
    """`factor: 1e30` is a string to PyYAML (no decimal point): the error said 1e30 was not finite."""
    spec = yaml.safe_load("{op: scale, layers: 2, expert: 5, factor: 1e30}")
    with pytest.raises(WorkbenchError, match=r"field 'factor' must be a finite number, got '1e30' \(a string: YAML "
                                             r"reads a number like 1e30 as text; write 1\.0e30\)"):
        Intervention.from_dict(spec)


def test_random_controls_of_two_generators_are_summarised_apart():
    """Every random_experts condition was one summary row: k=1 zero and k=4 drop controls averaged together."""
    rows = [{"condition": f"random x{k}{op} seed {seed}", "group": "random_experts", "seed": seed, "metric": "ppl",
             "mean": mean} for k, op, seed, mean in [(1, "", 0, 4.66), (1, "", 1, 4.37), (4, " drop", 0, 5.34),
                                                     (4, " drop", 1, 11.98)]]
    rows.append({"condition": "baseline", "group": None, "seed": None, "metric": "ppl", "mean": 4.0})
    got = summarise(pd.DataFrame(rows))["ppl"]
    assert list(got.index) == ["random x1", "random x4 drop", "baseline"]
    assert got["random x1"] == pytest.approx((4.66 + 4.37) / 2) and got["random x4 drop"] == pytest.approx(8.66)


def test_a_shared_super_expert_leaves_the_routed_one_of_its_number_in_the_random_pool(qwen2):
    """Shared expert 0 was keyed as (layer, 0) and took routed expert 0 out of the draw; it also counted toward k."""
    study = Study({"seeds": list(range(40)), "conditions": [{"generate": "random_experts"}]})
    supers = [{"layer": 1, "kind": "shared", "expert": 0}, {"layer": 1, "kind": "routed", "expert": 5}]
    with pytest.warns(UserWarning, match=r"every one is drawn before seed\(s\) 7, 8, 9, 10, 11, 12, \.\.\.: the "
                      r"control has 7 seed"):
        conds = study._random(qwen2, {"layers": None}, supers, "", "study")
    drawn = {iv.expert for c in conds for iv in c.interventions}
    assert 0 in drawn and 5 not in drawn and all(len(c.interventions) == 1 for c in conds)


def test_seeds_draw_other_random_experts_while_there_are_others(qwen2):
    """k cut to the pool made every seed take the whole pool: three identical conditions, pooled as three seeds (an
    interval of one value counted thrice). Seeds of a small pool also drew the same experts by chance: the shipped
    tiny_moe_super_expert.yaml's five k=1 controls were three experts."""
    study = Study({"seeds": [0, 1, 2], "conditions": [{"generate": "random_experts"}]})
    supers = [{"layer": 1, "kind": "routed", "expert": 5}]
    with pytest.warns(UserWarning) as seen:
        conds = study._random(qwen2, {"layers": [1], "k": 50}, supers, "", "study")
    assert [c.name for c in conds] == ["random x7 seed 0"] and len(conds[0].interventions) == 7
    assert any("there are 1 set(s) of 7 of those 7, and every one is drawn before seed(s) 1, 2: the control has 1 "
               "seed(s)" in str(w.message) for w in seen), [str(w.message) for w in seen]
    study = Study({"seeds": list(range(9)), "conditions": [{"generate": "random_experts"}]})
    with pytest.warns(UserWarning, match="there are 7 set"):  # 9 seeds, 7 experts: the last two draw none
        conds = study._random(qwen2, {"layers": [1], "k": 1}, supers, "", "study")
    draws = [tuple((iv.layers, iv.expert) for iv in c.interventions) for c in conds]
    assert len(draws) == len(set(draws)) == 7 and [c.seed for c in conds] == list(range(7))
    with pytest.warns(UserWarning, match="there are 7 set"):  # the same draws again: a seed's draw is its own
        assert conds == study._random(qwen2, {"layers": [1], "k": 1}, supers, "", "s")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conds = Study({"seeds": [0, 1, 2, 3, 4]})._random(qwen2, {"layers": [1], "k": 2}, supers, "", "study")
    assert len({tuple(iv.expert for iv in c.interventions) for c in conds}) == 5


def test_a_prompts_scope_outside_the_texts_is_said(qwen2):
    """A condition scoped to texts by `prompts` left cloze accuracy, tasks and generations as the baseline's (they
    run prompts of their own, which have no text number), and nothing said so."""
    study = Study({"texts": ["The capital of France is Paris.", "Water boils at one hundred degrees."],
                   "metrics": ["perplexity", "accuracy", "generations"], "generation_prompts": ["Hi"],
                   "max_new_tokens": 2, "conditions": [
                       {"name": "p", "interventions": [{"op": "zero", "layers": 1, "expert": e, "prompts": [1]}
                                                       for e in range(4)]},
                       {"name": "mixed", "interventions": [{"op": "zero", "layers": 1, "expert": 0, "prompts": [0]},
                                                           {"op": "zero", "layers": 2, "expert": 1}]}]})
    with pytest.warns(UserWarning) as seen:
        df = study.run(qwen2, progress=False)
    said = [str(w.message) for w in seen]
    assert any("condition 'p': 4 of its 4 intervention(s) pick texts (field 'prompts'), which accuracy, generations do "
               "not run: there they change nothing; those rows are the baseline's" in m for m in said), said
    assert any("condition 'mixed': 1 of its 2 intervention(s) pick texts" in m and "baseline's" not in m
               for m in said), said
    acc = df[df.metric == "accuracy"].set_index("condition")["mean"]
    assert acc["p"] == acc["baseline"]
    ppl = df[df.metric == "perplexity"].set_index("condition")["mean"]
    assert ppl["p"] != ppl["baseline"]  # on the texts it acts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Study({"texts": ["The capital of France is Paris."], "metrics": ["perplexity"], "conditions": [
            {"name": "q", "interventions": [{"op": "zero", "layers": 1, "expert": 0, "prompts": [0]}]}]}).run(
            qwen2, progress=False)


def test_one_token_texts_and_num_texts_past_the_texts_are_said_for_what_they_are(qwen2):
    """A one-token text's perplexity and sink are NaN by definition; the study said "the model's outputs are not
    finite there". num_texts past the texts there are was taken without a word."""
    study = Study({"texts": ["Hello", "The capital of France is Paris."], "num_texts": 5,
                   "metrics": ["perplexity", "sink"], "conditions": [{"name": "z", "interventions": [
                       {"op": "zero", "layers": 1, "expert": 0}]}]})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        df = study.run(qwen2, progress=False)
    said = [str(w.message) for w in seen]
    assert any("num_texts 5, but there are 2 texts: the study runs on those 2" in m for m in said), said
    assert any("1 text(s) of one token (text 0) have no next token to predict" in m for m in said), said
    assert not [m for m in said if "not finite" in m], said
    assert set(df[df.metric == "perplexity"].n) == {1}
