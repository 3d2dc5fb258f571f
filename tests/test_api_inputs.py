"""The Python API as a notebook calls it: odd arguments are one-line errors, generators are read once, and
merged trace results are the trace of all their prompts."""

import re

import pytest
import torch

from helpers import PROMPTS
from workbench.circuits.discover import CircuitOptions, find_circuit
from workbench.circuits.facts import builtin_facts
from workbench.data import check_prompts
from workbench.errors import WorkbenchError
from workbench.experts.profile import ProfileOptions, profile
from workbench.models.specs import load
from workbench.tracing.reducers import AbsMax, ExpertAbsMax, LogHistogram, Payload, TopK
from workbench.tracing.runner import trace
from workbench.tracing.sites import Component, Site, all_sites

RESID = [Site(0, Component.RESID_POST)]
QUICK = ProfileOptions(sinks=False, qk=False)


@pytest.fixture(scope="module")
def lm():
    return load("zoo:qwen3-moe")


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ----- prompts --------------------------------------------------------------------------------------------------

def test_a_generator_of_prompts_is_read_once(lm):
    r = trace(lm, (p for p in ["hello world", "the cat sat"]), RESID, progress=False)
    assert r.prompts == ["hello world", "the cat sat"] and r.meta["num_prompts"] == 2
    assert r.locate(r.num_tokens - 1)["prompt_index"] == 1
    p = profile(lm, (p for p in ["hello world", "the cat sat"]), QUICK, progress=False)
    assert p["meta"]["num_prompts"] == 2 and p["meta"]["num_tokens"] == r.num_tokens


@pytest.mark.parametrize("text", ["hello", "hello world"])
def test_one_string_as_prompts_is_refused(lm, text):
    with pytest.raises(WorkbenchError) as e:
        trace(lm, text, RESID, progress=False)
    assert one_line(e) == "prompts must be a list of strings, not one string: wrap it in a list"
    with pytest.raises(WorkbenchError, match="not one string"):
        profile(lm, text, QUICK, progress=False)


def test_a_domain_of_one_string_is_refused():
    with pytest.raises(WorkbenchError, match="domain 'code': prompts must be a list of strings, not one string"):
        ProfileOptions(domains={"code": "def f(): pass"})
    with pytest.raises(WorkbenchError, match="domains must be a dict"):
        ProfileOptions(domains=["a", "b"])
    assert ProfileOptions(domains={"code": (p for p in ["x = 1"])}).domains == {"code": ["x = 1"]}


def test_a_non_string_prompt_is_named_by_its_type():
    with pytest.raises(WorkbenchError) as e:
        check_prompts(["a", 5])
    assert one_line(e) == "prompt 1 is an int, not a string"
    with pytest.raises(WorkbenchError, match="prompt 0 is empty"):
        check_prompts([" "])
    with pytest.raises(WorkbenchError, match="not None"):
        check_prompts(None)


# ----- merging trace results ------------------------------------------------------------------------------------

def _sites(lm):
    return [*all_sites(lm.adapter, lm.model, ["resid_post", "router"]), Site(1, Component.EXPERT, 3)]


def test_merged_results_are_the_trace_of_all_prompts(lm):
    """Prompts traced in two parts and merged give the trace of all of them: peaks at the same global tokens,
    located in the same prompts, counts and histograms equal (batch size 1: every prompt computed alike)."""
    kinds = ["absmax", "log_histogram", "expert_counts", "moments"]
    run = lambda ps: trace(lm, ps, _sites(lm), kinds, batch_size=1, progress=False)  # noqa: E731
    whole, a, b = run(PROMPTS), run(PROMPTS[:2]), run(PROMPTS[2:])
    b_before = {s: r["absmax"].result() for s, r in b.reducers.items() if "absmax" in r}
    merged = a.merge(b)
    assert merged is a and merged.prompts == PROMPTS and merged.num_tokens == whole.num_tokens
    assert merged.meta["num_prompts"] == 4 and merged.meta["num_tokens"] == whole.num_tokens
    for name in ("token_prompt", "token_position", "token_ids"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    peaks_in_b = 0
    for site, reds in whole.reducers.items():
        for kind, r in reds.items():
            got = merged.reducers[site][kind].result()
            if kind == "moments":
                assert got["count"] == r.result()["count"]
                torch.testing.assert_close(merged.reducers[site][kind].mean, r.mean)
                continue
            assert got == r.result(), (site, kind)
            if kind == "absmax":
                assert merged.locate(got["token"]) == whole.locate(r.result()["token"])
                peaks_in_b += merged.locate(got["token"])["prompt_index"] >= 2
    assert peaks_in_b  # some peak lies in the second part, so its tokens were moved
    assert {s: r["absmax"].result() for s, r in b.reducers.items() if "absmax" in r} == b_before  # b unchanged


def test_merging_other_sites_or_itself_is_refused(lm):
    a = trace(lm, PROMPTS[:2], RESID, progress=False)
    b = trace(lm, PROMPTS[2:], [Site(1, Component.RESID_POST)], progress=False)
    with pytest.raises(WorkbenchError, match="different sites: the other one lacks site L0.resid_post"):
        a.merge(b)
    with pytest.raises(WorkbenchError, match="into itself"):
        a.merge(a)
    c = trace(lm, PROMPTS[2:], RESID, ["moments"], progress=False)
    with pytest.raises(WorkbenchError, match="different reducers"):
        a.merge(c)


# ----- one-line errors for wrong arguments ----------------------------------------------------------------------

BAD_TRACE = {
    "expert layer out of range": (dict(sites=[Site(99, "expert", 0)]), "layer out of range"),
    "router layer out of range": (dict(sites=[Site(99, "router")], reducers=["expert_counts"]), "layer out of range"),
    "fractional batch size": (dict(batch_size=2.5), "batch_size must be an integer >= 1, got 2.5"),
    "zero batch size": (dict(batch_size=0), "batch_size must be an integer >= 1"),
    "fractional max_tokens": (dict(max_tokens=1.5), "max_tokens must be an integer >= 1, got 1.5"),
    "no prompts": (dict(prompts=None), "prompts must be a list of strings"),
    "one site": (dict(sites=Site(0, "resid_post")), "not one Site: wrap it in a list"),
    "a site key": (dict(sites=["L0.resid_post"]), "Site.from_key"),
    "one reducer name": (dict(reducers="absmax"), "not one string: wrap it in a list"),
    "no reducers": (dict(reducers=[]), "nothing to compute"),
    # a sink at a site not traced was never fed (0 rows, unsaid); a truthy "no" batched by length
    "sink at an untraced site": (dict(sinks={Site(1, "resid_post"): [AbsMax()]}),
                                 "sinks given for L1.resid_post, which are not among the traced sites"),
    "sinks as a list": (dict(sinks=[AbsMax()]), "sinks must be a dict of site -> list of sinks, not list"),
    "by_length not a bool": (dict(by_length="no"), "by_length must be True or False, got 'no'"),
    "token id past the embedding": (dict(tokenized=[[1, 2], [10 ** 7]]),  # (torch's "index out of range in self")
                                    "tokenized holds token id 10000000, outside the model's embedding (ids 0..49151)"),
}


@pytest.mark.parametrize("case", list(BAD_TRACE))
def test_wrong_trace_arguments_are_one_line_errors(lm, case):
    kw, message = BAD_TRACE[case]
    args = {"prompts": PROMPTS[:2], "sites": RESID, **kw}
    with pytest.raises(WorkbenchError) as e:
        trace(lm, args.pop("prompts"), args.pop("sites"), **args, progress=False)
    assert message in one_line(e)


def test_no_reducers_runs_with_sinks_or_a_dump(lm, tmp_path):
    kept = AbsMax()
    trace(lm, PROMPTS[:2], RESID, reducers=(), sinks={RESID[0]: [kept]}, progress=False)
    assert int(kept.rows) > 0
    r = trace(lm, PROMPTS[:2], RESID, reducers=[], dump_dir=tmp_path / "dump", progress=False)
    assert r.reducers == {RESID[0]: {}}


@pytest.mark.parametrize("make, message", [
    (lambda: Site(0, "resid"), "unknown component 'resid'; known: resid_pre"),
    (lambda: Site("0", "resid_post"), "layer must be an integer, got '0'"),
    (lambda: Site(0, "expert", 1.5), "expert must be an integer"),
])
def test_bad_sites_are_one_line_errors(make, message):
    with pytest.raises(WorkbenchError) as e:
        make()
    assert message in one_line(e)


def test_all_sites_refuses_one_component_as_a_string(lm):
    with pytest.raises(WorkbenchError, match="not one: wrap it in a list"):
        all_sites(lm.adapter, lm.model, "resid_post")
    with pytest.raises(WorkbenchError, match="unknown component 'resid'"):
        all_sites(lm.adapter, lm.model, ["resid"])


@pytest.mark.parametrize("kw, message", [
    (dict(top_massive=0), "top_massive must be an integer >= 1, got 0"),
    (dict(top_massive=-1), "top_massive must be an integer >= 1, got -1"),
    (dict(batch_size=2.5), "batch_size must be an integer >= 1"),
    (dict(massive_ratio=float("nan")), "massive_ratio must be a number >= 0"),
])
def test_bad_profile_options_are_one_line_errors(kw, message):
    with pytest.raises(WorkbenchError) as e:
        ProfileOptions(**kw)
    assert message in one_line(e)


def test_profile_refuses_a_dict_of_options(lm):
    with pytest.raises(WorkbenchError, match="options must be a ProfileOptions, not dict"):
        profile(lm, PROMPTS, {"batch_size": 2}, progress=False)


@pytest.mark.parametrize("facts, options, message", [
    (lambda F: [], None, "no facts given"),
    (lambda F: F[:4], CircuitOptions(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (lambda F: F[0], None, "not one Fact: wrap it in a list"),
    (lambda F: [f.to_dict() for f in F[:3]], None, "fact 0 is a dict, not a Fact"),
    (lambda F: F[:4], {"batch_size": 2}, "options must be a CircuitOptions, not dict"),
])
def test_bad_circuit_arguments_are_one_line_errors(lm, facts, options, message):
    with pytest.raises(WorkbenchError) as e:
        find_circuit(lm, facts(builtin_facts()), options)
    assert message in one_line(e)


# ----- reducer states -------------------------------------------------------------------------------------------

def _payload(n: int = 5, c: int = 3) -> Payload:
    g = torch.Generator().manual_seed(0)
    return Payload(torch.randn(n, c, generator=g), torch.arange(n))


def test_a_state_of_other_settings_is_refused():
    with pytest.raises(ValueError, match="saved with lo=-6.0, this one has lo=-2"):
        LogHistogram(lo=-2, hi=2, num_bins=10).load_state_dict(LogHistogram().state_dict())
    with pytest.raises(ValueError, match="num_bins=96, this one has num_bins=10"):
        LogHistogram(lo=-6, hi=6, num_bins=10).load_state_dict(LogHistogram().state_dict())
    with pytest.raises(ValueError, match="saved with k=16, this one has k=4"):
        TopK(k=4).load_state_dict(TopK().state_dict())
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        AbsMax().load_state_dict({"bogus": torch.zeros(1)})


def test_states_round_trip_with_their_settings():
    h = LogHistogram(lo=-2.5, hi=2, num_bins=10)
    h.update(_payload())
    copy = LogHistogram(lo=-2.5, hi=2, num_bins=10).load_state_dict(h.state_dict())
    assert copy.result() == h.result()
    assert LogHistogram().load_state_dict({"counts": torch.ones(96, dtype=torch.int64)}).counts.sum() == 96  # older


def test_a_reducer_is_not_merged_into_itself():
    for r in (AbsMax(), LogHistogram(), TopK(k=2), ExpertAbsMax(num_experts=2)):
        with pytest.raises(ValueError, match="into itself"):
            r.merge(r)


def test_topk_needs_k_of_at_least_one():
    with pytest.raises(ValueError, match="k >= 1"):
        TopK(k=0)


def test_a_transformer_lens_bridge_that_computes_other_logits_is_refused(lm):
    """TransformerLens's bridge runs its own forward for some families: on DeepSeek-V3 it gave logits off by 0.35-0.6
    (of ~1) without a word, while the README promised the model's numbers. It is checked on a few tokens first."""
    ids = lm.tokenizer("Leonardo da", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(lm.to_transformer_lens()(ids), lm.model(ids).logits, rtol=1e-5, atol=1e-5)
    deepseek = load("zoo:deepseek-v3")
    with pytest.raises(WorkbenchError) as e:
        deepseek.to_transformer_lens()
    assert one_line(e).startswith("TransformerLens's bridge computes other logits than zoo:deepseek-v3 "
                                  "(DeepseekV3ForCausalLM): max |difference| ")
    with torch.no_grad():  # taken anyway when asked for, and the loaded model is as it was
        ids = deepseek.tokenizer("Leonardo da", return_tensors="pt").input_ids
        before = deepseek.model(ids).logits
        assert not torch.allclose(deepseek.to_transformer_lens(verify=False)(ids), before, atol=1e-2)
        assert torch.equal(deepseek.model(ids).logits, before)


@pytest.mark.parametrize("model_type,needle", [
    ("phimoe", None),  # TransformerLens spells it PhiMoEForCausalLM: found
    ("dbrx", "TransformerLens has no bridge for DbrxForCausalLM (model type dbrx); use lm.to_nnsight()"),
    ("granitemoehybrid", "TransformerLens cannot bridge "),  # its bridge fails on a forward
])
def test_transformer_lens_bridges_of_other_families_work_or_say_why_in_one_line(tmp_path, zoo_tokenizer, model_type,
                                                                               needle):
    """phimoe was refused for want of TransformerLens' spelling of its class; dbrx raised TransformerLens' own
    ValueError listing ~150 architectures; granitemoehybrid an AttributeError from inside the bridge (the adapter's
    prepared layer answered shared_mlp with the MoE block: the bridge now gets transformers' own modules)."""
    from workbench.models.families import save_tiny

    lm = load(str(save_tiny(model_type, tmp_path / model_type, zoo_tokenizer)))
    ids = lm.tokenizer("Leonardo da", return_tensors="pt").input_ids
    with torch.no_grad():
        before = lm.model(ids).logits
    if needle is None:
        lm.to_transformer_lens()  # checked against the model's logits inside
    else:
        with pytest.raises(WorkbenchError) as e:
            lm.to_transformer_lens()
        assert needle in one_line(e) and len(str(e.value)) < 400
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, before)  # the loaded model (prepared, as the workbench reads it)


def test_contrast_reads_generators_once_and_refuses_a_top_k_below_one(lm, tmp_path):
    """contrast read a generator of prompts twice (tokenised, then found empty by the trace: "no prompts given");
    top_interventions(df, -1) returned every row but the last (pandas' head(-1)); write() took no str folder."""
    from workbench.experts.contrast import contrast, top_interventions, write

    pos = ["The zebra runs across the plain.", "A zebra eats grass."]
    neg = ["The horse runs across the plain.", "A horse eats grass."]
    df = contrast(lm, (p for p in pos), (n for n in neg), progress=False)
    assert df.equals(contrast(lm, pos, neg, progress=False))
    for k, msg in ((-1, "k must be an integer >= 1, got -1"), (1.5, "got 1.5"), ("3", "got '3'")):
        with pytest.raises(WorkbenchError, match=re.escape(msg)):
            top_interventions(df, k)
    with pytest.raises(WorkbenchError, match="^negative: prompts must be a list of strings, not one string"):
        contrast(lm, pos, "A horse eats grass.", progress=False)
    assert (tmp_path / "c" / "contrast.csv") in write(df, str(tmp_path / "c"), 2, "drop")


def test_an_output_folder_that_is_a_file_is_one_line(lm, tmp_path):
    """Study.run into a file and routing's workdir a file raised pathlib's and tempfile's NotADirectoryError."""
    from workbench.experts.routing import routing
    from workbench.studies import Study

    afile = tmp_path / "afile"
    afile.write_text("x")
    study = Study({"texts": ["The capital of France is Paris."], "metrics": ["perplexity"], "conditions": []})
    with pytest.raises(WorkbenchError, match=f"^out_dir {re.escape(str(afile))} is a file, not a folder$"):
        study.run(lm, afile, progress=False)
    with pytest.raises(WorkbenchError, match=r"is not a folder \(it is a file\)$"):
        routing(["zoo:qwen3-moe", "zoo:qwen3-moe"], PROMPTS[:2], load=load, workdir=afile)
    with pytest.raises(WorkbenchError, match=r"is not a folder \(it does not exist\)$"):
        routing(["zoo:qwen3-moe", "zoo:qwen3-moe"], PROMPTS[:2], load=load, workdir=tmp_path / "nope")


def test_layer_lists_expert_pairs_and_drawing_sizes_of_the_wrong_kind_are_one_line(lm, tmp_path):
    """all_sites(layers=['1']) failed comparing int and str; expert_writers((1, 2)) unpacked two pairs, and "L1.E2"
    failed in a comparison; circuit_svg(max_edges=2.5) and write_png(dpi=0) failed inside matplotlib."""
    from workbench.circuits.export import Circuit
    from workbench.circuits.render import circuit_svg, write_png
    from workbench.sae.features import expert_writers
    from workbench.tracing.sites import all_sites

    with pytest.raises(WorkbenchError, match=r"^layers must be integers, got '1'$"):
        all_sites(lm.adapter, lm.model, ["resid_post"], layers=["1"])
    assert [s.layer for s in all_sites(lm.adapter, lm.model, ["resid_post"], layers=[torch.tensor(1).item()])] == [1]
    for bad in ((1, 2), "L1.E2", [("1", "2")], [(1.0, 2)], [(1, 2, 3)]):
        with pytest.raises(WorkbenchError, match=r"^experts must be a list of \(layer, expert\) integer pairs"):
            expert_writers(lm, bad)
    import numpy as np

    assert [w.name for w in expert_writers(lm, [(np.int64(1), 2)])] == ["L1.E2"]
    nodes = {"input": {"kind": "input", "layer": -1, "index": 0, "head": -1, "expert": -1},
             "logits": {"kind": "logits", "layer": 1, "index": 0, "head": -1, "expert": -1}}
    c = Circuit(nodes, [{"source": "input", "target": "logits", "port": "in", "score": 1.0}], {"model": "m"})
    with pytest.raises(WorkbenchError, match=r"^max_edges must be an integer, got 2.5$"):
        circuit_svg(c, max_edges=2.5)
    with pytest.raises(WorkbenchError, match=r"^dpi must be an integer >= 1, got 0$"):
        write_png(c, tmp_path / "c.png", dpi=0)
    assert not (tmp_path / "c.png").exists()
