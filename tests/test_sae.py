"""SAELens SAEs on workbench models: loading and site checks, splicing, expert/node -> features, steering."""

import re

import pytest
import torch
import yaml

from workbench.errors import WorkbenchError
from workbench.interventions import Intervention, apply
from workbench.models.specs import load
from workbench.tracing.sites import Component, Site

from helpers import PROMPTS, one_error

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

from workbench.sae import attach, load_sae, resolve_site  # noqa: E402
from workbench.sae.features import (annotate_circuit, expert_features, node_features,  # noqa: E402
                                    write_report)

LAYER, EXPERT, FEATURE, D = 1, 5, 7, 64
TEXTS = PROMPTS * 3 + ["The Pacific Ocean is the largest ocean.", "Water boils at one hundred degrees."]


def make_sae(path, d_in=D, d_sae=32, hook="blocks.1.hook_resid_post", W_dec=None, W_enc=None, **meta):
    """A StandardSAE built and saved with SAELens' own classes and format."""
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook, **meta)))
    with torch.no_grad():
        if W_dec is not None:
            sae.W_dec.copy_(W_dec)
            sae.W_enc.copy_(W_dec.T if W_enc is None else W_enc)
            sae.b_enc.zero_()
            sae.b_dec.zero_()
    sae.save_model(path)
    return path


def identity_weights(d=D):
    eye = torch.eye(d)
    return torch.cat([eye, -eye], 0), torch.cat([eye, -eye], 1)  # relu(x) - relu(-x) == x exactly


@pytest.fixture(scope="module")
def direction():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(D, generator=g)
    return d / d.norm()


@pytest.fixture(scope="module")
def planted(direction):
    """zoo:qwen3-moe whose layer-1 expert 5 writes only +direction (gate == up, so act(g) * u >= 0)."""
    lm = load("zoo:qwen3-moe")
    ex = lm.adapter.experts(lm.adapter.decoder_layers(lm.model)[LAYER])
    inter = ex.down_proj.shape[2]
    with torch.no_grad():
        ex.gate_up_proj[EXPERT, inter:] = ex.gate_up_proj[EXPERT, :inter]
        r = torch.rand(inter, generator=torch.Generator().manual_seed(1))
        ex.down_proj[EXPERT] = 20 * direction[:, None] * r[None, :]
    return lm


@pytest.fixture(scope="module")
def planted_sae(tmp_path_factory, direction):
    """An SAE at L1.resid_post whose decoder (and encoder) row FEATURE is the planted direction."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(32, D, generator=g)
    W = W / W.norm(dim=1, keepdim=True)
    W[FEATURE] = direction
    return make_sae(tmp_path_factory.mktemp("planted_sae"), W_dec=W)


def logits(lm, texts=("The capital of France is Paris. And",)):
    ids = lm.tokenizer(list(texts), return_tensors="pt").input_ids
    with torch.no_grad():
        return lm.model(ids).logits


# ----- (a) planted feature ----------------------------------------------------------------------
def test_planted_expert_ranks_its_feature_first(planted, planted_sae, tmp_path):
    sae = load_sae(planted_sae)  # built with SAELens classes, saved in its format, loaded back through ours
    assert resolve_site(planted, sae) == Site(LAYER, Component.RESID_POST)
    report = expert_features(planted, sae, TEXTS, top=3)
    t = report.table
    assert set(t.writer) == {f"L{l}.E{e}" for l in (0, 1) for e in range(8)}  # experts reaching L1.resid_post
    mine = t[t.writer == f"L{LAYER}.E{EXPERT}"].iloc[0]
    assert mine.feature == FEATURE and mine["rank"] == 1 and mine.frac_raised == 1.0
    others = t[(t.writer != mine.writer) & (t["rank"] == 1)]
    assert mine.score > 100 * others.score.max()
    assert mine.delta_pre == pytest.approx(mine.score, rel=0.05)  # ReLU stays on: delta act ~ delta pre
    assert (report.tokens[report.tokens.feature == FEATURE].activation > 0).all() and mine.top_tokens
    files = write_report(report, tmp_path)
    assert {f.name for f in files} >= {"expert_features.parquet", "expert_features.csv", "expert_features.png",
                                       "feature_tokens.parquet"}


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo2", "granite", "llama"])
def test_a_writer_reaches_a_residual_site_through_its_blocks_output_norm_and_multiplier(model_type, tmp_path,
                                                                                        zoo_tokenizer):
    """At a residual site a writer's contribution was its raw output: Granite's residual_multiplier (0.22 here) and
    the output norms of sandwich / post-norm blocks (Gemma 2/3, OLMo 2) were left out, so x - c was not x without
    the writer (|c| 4.5x, 0.002x what it adds). With an identity SAE (features relu(x), relu(-x)), the scores of the
    layer's MLP are now relu(x) - relu(x - c) for c what zeroing the MLP takes out of resid_post."""
    from workbench.models.families import save_tiny
    from workbench.sae.features import expert_writers, writer_features

    lm = load(str(save_tiny(model_type, tmp_path / "m", zoo_tokenizer)))
    d = int(lm.config.hidden_size)
    W_dec, W_enc = identity_weights(d)
    sae = load_sae(make_sae(tmp_path / "sae", d_in=d, d_sae=2 * d, W_dec=W_dec, W_enc=W_enc))
    texts = TEXTS[:4]
    table = writer_features(lm, sae, expert_writers(lm, [(1, 0)]), texts, top=2 * d).table
    block = lm.adapter.decoder_layers(lm.model)[1]
    seen = {}
    h = block.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out[0] if isinstance(out, tuple) else out))
    ref, n = torch.zeros(2 * d, dtype=torch.float64), 0
    try:
        for text in texts:  # each text alone, and again with the layer's MLP output zeroed
            ids = lm.tokenizer(text, return_tensors="pt").input_ids
            with torch.no_grad():
                lm.model(ids)
                x = seen["x"][0, 1:].double()  # the first token is left out, as writer_features does
                z = lm.adapter.mlp(block).register_forward_hook(lambda m, a, out: torch.zeros_like(out))
                try:
                    lm.model(ids)
                finally:
                    z.remove()
            without = seen["x"][0, 1:].double()
            feats = lambda v: torch.cat([v.clamp(min=0), (-v).clamp(min=0)], -1)  # noqa: E731
            ref += (feats(x) - feats(without)).sum(0)
            n += x.shape[0]
    finally:
        h.remove()
    ref /= n
    assert len(table) > 0
    got = torch.tensor(table.score.to_numpy(), dtype=torch.float64)
    torch.testing.assert_close(got, ref[torch.tensor(table.feature.to_numpy())], rtol=1e-4,
                               atol=1e-5 * float(ref.abs().max()))


# ----- (b) splicing: identity-like SAEs leave logits unchanged ----------------------------------
@pytest.mark.parametrize("spec,site", [("zoo:qwen3-moe", "L1.resid_pre"), ("zoo:qwen3-moe", "L1.resid_post"),
                                       ("zoo:qwen3-moe", "L1.attn_out"), ("zoo:qwen3-moe", "L1.mlp_out"),
                                       ("zoo:qwen3-moe", "L1.expert.E3"), ("zoo:qwen3-moe-modulelist", "L1.expert.E3"),
                                       ("zoo:qwen2-moe", "L2.shared_expert.E0")])
def test_identity_sae_leaves_logits_unchanged(spec, site, tmp_path):
    lm = load(spec)
    base = logits(lm)
    W_dec, W_enc = identity_weights()
    ident = load_sae(make_sae(tmp_path / "id", d_sae=2 * D, W_dec=W_dec, W_enc=W_enc))
    with attach(lm, ident, site) as s:
        assert s.site == Site.from_key(site)
        assert torch.equal(logits(lm), base)  # zero reconstruction error: bit-identical
    rand = load_sae(make_sae(tmp_path / "rand", d_sae=128))
    with attach(lm, rand, site, error_term=True, keep_acts=True) as s:
        torch.testing.assert_close(logits(lm), base, rtol=0, atol=1e-5)  # error term added back
        assert s.acts is not None and s.acts.shape[1] == 128
    with attach(lm, rand, site):  # the hook is really there: a lossy SAE moves the logits
        assert (logits(lm) - base).abs().max() > 1e-3
    assert torch.equal(logits(lm), base)  # and leaving restores the model


# ----- (c) one-line errors --------------------------------------------------------------------------
def test_bad_d_in_site_or_folder_is_one_line_error(planted, tmp_path):
    cases = {
        "d_in": (make_sae(tmp_path / "a", d_in=32), None, "d_in 32 does not fit site L1.resid_post"),
        "layer": (make_sae(tmp_path / "b", hook="blocks.9.hook_resid_post"), None, "layer out of range"),
        "hook": (make_sae(tmp_path / "c", hook="blocks.1.hook_resid_mid"), None, "no matching workbench site"),
        "router": (make_sae(tmp_path / "d"), "L1.router", "cannot hold an SAE"),
        "expert": (make_sae(tmp_path / "e"), "L1.expert.E9", "expert out of range"),
    }
    for name, (path, site, msg) in cases.items():
        sae = load_sae(path)
        with pytest.raises(WorkbenchError, match=msg) as e:
            attach(planted, sae, site)
        assert "\n" not in str(e.value), name
    (tmp_path / "empty").mkdir()
    for bad, msg in ((tmp_path / "empty", "no cfg.json"), (tmp_path / "nope", "not a directory"),
                     (None, "an SAE is a folder path")):  # None was a TypeError from pathlib
        with pytest.raises(WorkbenchError, match=msg) as e:
            load_sae(bad)
        assert "\n" not in str(e.value)


def test_cli_bad_sae_is_one_error_line(tmp_path, capsys):
    from workbench.cli import main

    make_sae(tmp_path / "small", d_in=32)
    assert main(["sae", "features", "zoo:qwen3-moe", "--sae", str(tmp_path / "small"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "d_in 32" in err[0]


def test_cli_features_from_profile_and_circuit(planted_sae, tmp_path, capsys):
    import json

    from workbench.circuits.export import Circuit, read_json, write_json
    from workbench.cli import main
    from workbench.sae.features import profile_experts

    experts = [{"layer": l, "expert": e, "kind": "routed", "max_abs": float(10 * l + e)} for l in range(2) for e in range(8)]
    experts.append({"layer": 0, "expert": 0, "kind": "shared", "max_abs": 1e9})  # shared experts are skipped
    profile = {"experts": experts, "super_experts": [{"layer": 0, "expert": 2, "kind": "routed"}]}
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    assert profile_experts(tmp_path / "profile.json", 3) == [(0, 2), (1, 7), (1, 6)]
    args = ["sae", "features", "zoo:qwen3-moe", "--sae", str(planted_sae), "--max-tokens", "16", "--quiet",
            "--text", "The capital of France is Paris.", "--text", "Water boils at one hundred degrees."]
    assert main(args + ["--profile", str(tmp_path / "profile.json"), "--top-experts", "3", "--out", str(tmp_path / "a")]) == 0
    table = __import__("pandas").read_parquet(tmp_path / "a" / "expert_features.parquet")
    assert set(table.writer) <= {"L0.E2", "L1.E7", "L1.E6"}
    assert (tmp_path / "a" / "expert_features.png").stat().st_size > 0
    nodes = {"a1.h0": {"kind": "head", "layer": 1, "index": 0}, "m1.e3": {"kind": "expert", "layer": 1, "index": 3}}
    write_json(Circuit(nodes, [{"source": "a1.h0", "target": "m1.e3", "port": "in", "score": 0.5}], {}),
               tmp_path / "c.json")
    assert main(args + ["--circuit", str(tmp_path / "c.json"), "--out", str(tmp_path / "b")]) == 0
    annotated = read_json(tmp_path / "b" / "circuit.json")
    assert annotated.nodes["a1.h0"]["sae_site"] == "L1.resid_post" and "sae_features" in annotated.nodes["m1.e3"]
    graphml = __import__("networkx").read_graphml(tmp_path / "b" / "circuit.graphml")
    assert graphml.nodes["m1.e3"]["sae_features"] == annotated.nodes["m1.e3"]["sae_features"]
    assert "writers into L1.resid_post" in capsys.readouterr().out


def test_cli_features_from_a_profile_skip_experts_after_the_site(planted_sae, tmp_path, capsys):
    """A profile of the whole 4-layer model ranks experts of layers 2-3 first; they cannot write into the SAE's
    site (L1.resid_post), so the next experts that can take their places, with a note; none at all is an error."""
    import json

    import pandas as pd

    from workbench.cli import main

    experts = [{"layer": l, "expert": e, "kind": "routed", "max_abs": float(10 * l + e)} for l in range(4) for e in range(8)]
    supers = [{"layer": 3, "expert": 1, "kind": "routed"}, {"layer": 0, "expert": 2, "kind": "routed"}]
    (tmp_path / "profile.json").write_text(json.dumps({"experts": experts, "super_experts": supers}))
    args = ["sae", "features", "zoo:qwen3-moe", "--sae", str(planted_sae), "--max-tokens", "16", "--top-experts", "3",
            "--text", "The capital of France is Paris.", "--text", "Water boils at one hundred degrees."]
    assert main(args + ["--profile", str(tmp_path / "profile.json"), "--out", str(tmp_path / "a")]) == 0
    assert set(pd.read_parquet(tmp_path / "a" / "expert_features.parquet").writer) <= {"L0.E2", "L1.E7", "L1.E6"}
    out, err = capsys.readouterr()
    assert "3 writers into L1.resid_post" in out  # (an expert routed no token gets no row)
    from workbench.models.specs import load

    tok = load("zoo:qwen3-moe").tokenizer
    n = sum(min(16, len(tok(t).input_ids)) - 1 for t in args[args.index("--text") + 1::2])  # the tokens scored
    assert f"of zoo:qwen3-moe, {n} tokens (first tokens left out)" in out, out
    assert ("warning: of the profile's top 3 experts, 2 do not write into L1.resid_post directly (L3.E1, L3.E7: "
            "later layers); the next experts that write into the site take their places") in err
    # a shared expert among the top was left out without a word (--quiet hid the note on the others too)
    shared = experts + [{"layer": 1, "expert": 0, "kind": "shared", "max_abs": 99.0}]
    (tmp_path / "shared.json").write_text(json.dumps({"experts": shared, "super_experts": supers[1:]}))
    assert main(args + ["--profile", str(tmp_path / "shared.json"), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "1 are shared experts, not writers yet (L1.S0)" in err and "1 do not write into" in err, err
    late = [e for e in experts if e["layer"] >= 2]
    (tmp_path / "late.json").write_text(json.dumps({"experts": late, "super_experts": supers[:1]}))
    one_error(main(args + ["--profile", str(tmp_path / "late.json"), "--out", str(tmp_path / "b")]),
              capsys.readouterr().err, "none of the 16 experts of", "writes into site L1.resid_post")


# ----- circuit nodes -----------------------------------------------------------------------------
def test_circuit_node_features(planted, planted_sae, tmp_path):
    from workbench.circuits.export import Circuit, read_json, write_json
    from workbench.sae.features import HeadOutputs
    from workbench.sae.stream import Buffer, Tokens, forward_batches

    nodes = {"input": {"kind": "input", "layer": -1, "index": -1},
             "a1.h2": {"kind": "head", "layer": 1, "index": 2},
             f"m1.e{EXPERT}": {"kind": "expert", "layer": 1, "index": EXPERT},
             "m1.e0": {"kind": "expert", "layer": 1, "index": 0},
             "m2.e0": {"kind": "expert", "layer": 2, "index": 0},  # writes after the site: no attributes
             "logits": {"kind": "logits", "layer": 4, "index": -1}}
    edges = [{"source": "input", "target": n, "port": "in", "score": 1.0} for n in nodes if n not in ("input",)]
    circuit = Circuit(nodes, edges, {"model": "zoo:qwen3-moe"})
    with pytest.warns(UserWarning, match=r"1 of the circuit's 4 head, MLP and expert nodes do not write into "
                                         r"L1\.resid_post directly \(m2\.e0: later layers\)"):  # left out unsaid
        attrs, report = node_features(planted, load_sae(planted_sae), circuit, TEXTS, top=3)
    assert set(attrs) == {"a1.h2", f"m1.e{EXPERT}", "m1.e0"}
    assert attrs[f"m1.e{EXPERT}"]["sae_top_feature"] == FEATURE
    assert attrs[f"m1.e{EXPERT}"]["sae_features"].split(",")[0] == str(FEATURE)
    out = annotate_circuit(circuit, attrs)
    write_json(out, tmp_path / "circuit.json")
    back = read_json(tmp_path / "circuit.json")
    assert back.nodes[f"m1.e{EXPERT}"]["sae_top_feature"] == FEATURE and back.nodes["a1.h2"]["sae_site"] == "L1.resid_post"
    # head outputs are exact slices of o_proj: they add up to the attention output
    tokens = Tokens.of(planted, TEXTS[:4], None)
    buf, heads = Buffer(), HeadOutputs(planted, {1: [0, 1, 2, 3]})
    with heads:
        for _ in forward_batches(planted, tokens, {Site(1, Component.ATTN_OUT): [buf]}, batch_size=4, meters=[heads]):
            total = sum(heads.out[(1, h)] for h in range(4))
            torch.testing.assert_close(total, buf.take().values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "dbrx"])
def test_head_outputs_of_other_output_projections_add_up(model_type, tmp_path, zoo_tokenizer):
    """GPT-2's Conv1D ``c_proj`` (weight [in, out], with a bias) and DBRX's ``out_proj``: the heads' slices
    plus the projection's bias are the attention output."""
    from workbench.models.families import save_tiny
    from workbench.sae.features import HeadOutputs
    from workbench.sae.stream import Buffer, Tokens, forward_batches

    lm = load(str(save_tiny(model_type, tmp_path, zoo_tokenizer)))
    tokens = Tokens.of(lm, TEXTS[:4], None)
    buf, heads = Buffer(), HeadOutputs(lm, {1: [0, 1, 2, 3]})
    attn = lm.adapter.attention(lm.adapter.decoder_layers(lm.model)[1])
    bias = getattr(getattr(attn, "c_proj", None) or attn.out_proj, "bias", None)
    with heads:
        for _ in forward_batches(lm, tokens, {Site(1, Component.ATTN_OUT): [buf]}, batch_size=4, meters=[heads]):
            total = sum(heads.out[(1, h)] for h in range(4)) + (0 if bias is None else bias)
            torch.testing.assert_close(total, buf.take().values, rtol=1e-5, atol=1e-5)


# ----- steering ------------------------------------------------------------------------------------
def test_sae_steer_adds_the_decoder_direction(planted, planted_sae, direction):
    spec = {"op": "sae_steer", "sae": str(planted_sae), "feature": FEATURE, "coef": 3.0, "positions": [-1]}
    iv = Intervention.from_dict(spec)
    assert iv.layers == (LAYER,) and iv.site == "L1.resid_post"
    assert Intervention.from_dict(iv.to_dict()) == iv
    ids = planted.tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    diff = _next_layer_input(planted, ids, [iv]) - _next_layer_input(planted, ids, [])
    torch.testing.assert_close(diff[0, -1], 3.0 * direction, rtol=1e-5, atol=1e-5)
    assert diff[0, :-1].abs().max() == 0  # positions: [-1] only


def _next_layer_input(lm, ids, ivs):
    """Layer LAYER's output as the next layer receives it, with ``ivs`` applied."""
    nxt = lm.adapter.decoder_layers(lm.model)[LAYER + 1]
    got = []
    h = nxt.register_forward_pre_hook(lambda m, a, k: got.append((a[0] if a else k["hidden_states"]).clone()),
                                      with_kwargs=True)
    try:
        with torch.no_grad(), apply(lm, ivs):
            lm.model(ids)
    finally:
        h.remove()
    return got[0]


def test_bad_steer_spec_fails_before_model_work(planted_sae, tmp_path):
    from workbench.studies import Study

    base = {"op": "sae_steer", "sae": str(planted_sae), "feature": FEATURE, "coef": 1.0}
    for change, msg in (({"feature": 32}, "field 'feature': 32 out of range"), ({"sae": str(tmp_path)}, "no cfg.json"),
                        ({"coef": "big"}, "number field 'coef'"), ({"layers": 3}, "is in layer 1")):
        spec = {"name": "s", "conditions": [{"name": "c", "interventions": [{**base, **change}]}]}
        with pytest.raises(WorkbenchError, match=msg) as e:
            Study(spec)
        assert "\n" not in str(e.value)


def test_study_compares_expert_ablation_with_feature_steering(planted, planted_sae, tmp_path):
    from workbench.studies import Study

    study = {"name": "ablate-vs-steer", "num_texts": 4, "metrics": ["perplexity", "kl"], "batch_size": 4,
             "conditions": [{"name": "zero expert", "interventions": [{"op": "zero", "layers": LAYER, "expert": EXPERT}]},
                            {"name": "steer feature", "interventions": [
                                {"op": "sae_steer", "sae": str(planted_sae), "feature": FEATURE, "coef": -4.0}]}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    df = Study.from_file(path).run(planted, tmp_path / "out", progress=False)
    kl = df[df.metric == "kl"].set_index("condition")["mean"]
    assert list(kl.index) == ["baseline", "zero expert", "steer feature"]
    assert kl["baseline"] == 0 and kl["zero expert"] > 0 and kl["steer feature"] > 0
    written = yaml.safe_load((tmp_path / "out" / "study.resolved.yaml").read_text())
    written.pop("model")  # the resolved study records the model and the implicit baseline; a study file takes neither
    written["conditions"] = [c for c in written["conditions"] if c["name"] != "baseline"]
    resolved = Study(written)  # round trip through the written study
    steer = resolved.explicit[1].interventions[0]
    assert steer.op == "sae_steer" and steer.feature == FEATURE and steer.coef == -4.0 and steer.layers == (LAYER,)
    again = resolved.run(planted, tmp_path / "again", progress=False)
    assert again[again.metric == "kl"].set_index("condition")["mean"].equals(kl)


def test_a_relative_sae_path_in_a_study_is_read_beside_the_study_file(planted_sae, tmp_path, monkeypatch):
    """It was read from the current folder (a study's texts were already read beside the study file): a study
    beside its SAE failed when run from elsewhere."""
    import shutil

    from workbench.studies import Study

    (tmp_path / "sub").mkdir()
    shutil.copytree(planted_sae, tmp_path / "sub" / "my-sae")
    steer = {"op": "sae_steer", "sae": "my-sae", "feature": FEATURE, "coef": 2.0}
    (tmp_path / "sub" / "s.yaml").write_text(yaml.safe_dump({"conditions": [{"name": "s", "interventions": [steer]}]}))
    monkeypatch.chdir(tmp_path)
    iv = Study.from_file("sub/s.yaml").explicit[0].interventions[0]
    assert iv.sae == str(tmp_path / "sub" / "my-sae")  # absolute: study.resolved.yaml runs from anywhere
    shutil.copytree(planted_sae, tmp_path / "cwd-sae")  # still found in the current folder when not beside the study
    (tmp_path / "sub" / "s2.yaml").write_text(yaml.safe_dump(
        {"conditions": [{"name": "s", "interventions": [dict(steer, sae="cwd-sae")]}]}))
    assert Study.from_file("sub/s2.yaml").explicit[0].interventions[0].sae == str(tmp_path / "cwd-sae")


def test_an_sae_of_another_model_is_flagged():
    """The width was all that was checked: an SAE trained on zoo:tiny-moe read (and steered) zoo:qwen2-moe without a
    word."""
    import warnings as w

    from workbench.models.specs import load
    from workbench.sae import resolve_site

    lm = load("zoo:qwen2-moe")
    cfg = {"d_in": 64, "d_sae": 128, "metadata": {"model_name": "zoo:tiny-moe", "workbench_site": "L1.resid_post"}}
    with pytest.warns(UserWarning, match="SAE: trained on zoo:tiny-moe, read here on zoo:qwen2-moe"):
        resolve_site(lm, cfg)
    with w.catch_warnings():
        w.simplefilter("error")
        resolve_site(lm, {**cfg, "metadata": {**cfg["metadata"], "model_name": "zoo:qwen2-moe"}})


def test_one_model_under_other_path_spellings_is_not_flagged(tmp_path):
    """`sae train ./m/phi3` recorded the path as typed, and reading it with `m/phi3` or the absolute path warned
    "trained on another model" (twice: both expert_features and writer_features checked)."""
    from workbench.sae.loading import same_model

    (tmp_path / "m").mkdir()
    assert same_model(str(tmp_path / "m"), str(tmp_path / "m" / ".." / "m"))
    assert same_model("zoo:qwen2-moe", "zoo:qwen2-moe") and not same_model("zoo:qwen2-moe", "zoo:tiny-moe")
    assert not same_model(str(tmp_path / "m"), str(tmp_path / "other"))  # one does not exist: not the same


def test_an_sae_study_steer_is_checked_whole_before_model_work(planted, planted_sae, tmp_path):
    """Only cfg.json was read before the study ran: an SAE of another model steered without a word, and truncated
    weights or a W_dec of another size than cfg.json's stopped the study after its first conditions had run."""
    import json
    import shutil

    from workbench.studies import Study

    def study(sae):
        return Study({"name": "s", "num_texts": 2, "metrics": ["perplexity"], "conditions": [
            {"name": "zero", "interventions": [{"op": "zero", "layers": LAYER, "expert": EXPERT}]},
            {"name": "steer", "interventions": [{"op": "sae_steer", "sae": str(sae), "feature": 3, "coef": 1.0}]}]})
    cut = tmp_path / "cut"
    shutil.copytree(planted_sae, cut)
    weights = cut / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    wide = tmp_path / "wide"
    shutil.copytree(planted_sae, wide)
    cfg = json.loads((wide / "cfg.json").read_text())
    (wide / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 64}))
    for sae, msg in ((cut, r"sae_weights.safetensors is cut short \(\d+ bytes, its header needs \d+\)"),
                     (wide, r"has W_dec of shape \[32, 64\], cfg.json says d_sae x d_in = \[64, 64\]")):
        with pytest.raises(WorkbenchError, match=msg):
            study(sae).run(planted, tmp_path / f"out-{sae.name}", progress=False)
        assert not list((tmp_path / f"out-{sae.name}").rglob("*.json"))  # no condition ran
    other = tmp_path / "other"
    shutil.copytree(planted_sae, other)
    cfg = json.loads((other / "cfg.json").read_text())
    (other / "cfg.json").write_text(json.dumps({**cfg, "metadata": {**cfg["metadata"], "model_name": "zoo:tiny-moe"}}))
    with pytest.warns(UserWarning, match=r"field 'sae' \(.*other\): trained on zoo:tiny-moe, read here on "
                                         "zoo:qwen3-moe"):
        study(other).run(planted, tmp_path / "out-other", progress=False)


def test_a_circuit_of_another_model_is_said_and_nodes_it_lacks_refused(planted, planted_sae):
    """A head past the layer's heads read as an empty slice (a contribution of nothing, no word), and a circuit found
    on another model was read without one; an expert past the layer's said 'site L0.expert.E9: expert out of range'."""
    from workbench.circuits.export import Circuit

    sae = load_sae(planted_sae)
    for node, msg in (("a1.h7", r"circuit node a1\.h7: layer 1 of zoo:qwen3-moe has 4 heads \(the circuit is of "
                                r"zoo:tiny-moe\)"),
                      ("m1.e9", r"circuit node m1\.e9: layer 1 of zoo:qwen3-moe has 8 expert\(s\)"),
                      ("a9.h0", r"circuit node a9\.h0: zoo:qwen3-moe has 4 layers")):
        kind = "head" if node.startswith("a") else "expert"
        layer, index = int(node[1]), int(node.split(".")[1][1:])
        nodes = {"input": {"kind": "input", "layer": -1, "index": -1},
                 node: {"kind": kind, "layer": layer, "index": index}}
        circuit = Circuit(nodes, [{"source": "input", "target": node, "port": "in", "score": 1.0}],
                          {"model": "zoo:tiny-moe"})
        with pytest.warns(UserWarning, match="the circuit was found on zoo:tiny-moe, its nodes are read here on "
                                             "zoo:qwen3-moe"):
            with pytest.raises(WorkbenchError, match=msg):
                node_features(planted, sae, circuit, TEXTS[:2])


def test_no_writer_reaching_the_site_is_said_for_what_the_site_is(planted, tmp_path):
    """"none of the 0 writers feeds site L1.attn_out directly (experts reach resid_post ...)" for every site that no
    expert can reach."""
    from workbench.sae.features import nothing_feeds

    for site, msg in (("L1.attn_out", "no expert or MLP writes into L1.attn_out: only attention heads do"),
                      ("L0.resid_pre", "nothing but the embedding writes into L0.resid_pre")):
        sae = load_sae(make_sae(tmp_path / site, hook=site))
        with pytest.raises(WorkbenchError, match=f"^{msg}"):
            expert_features(planted, sae, TEXTS[:2])
    # (zoo:qwen3-moe has no shared expert to put an SAE on)
    assert nothing_feeds(Site(2, Component.SHARED_EXPERT, 0), 0).endswith("shared experts are not writers yet: no "
                                                                          "writer reaches it")


def test_saelens_load_errors_keep_their_cause(planted_sae, tmp_path):
    """torch's state-dict error puts the cause on its second line, which was cut ("Error(s) in loading state_dict
    for StandardSAE:" and nothing after)."""
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(planted_sae, bad)
    cfg = json.loads((bad / "cfg.json").read_text())
    (bad / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 48}))
    with pytest.raises(WorkbenchError, match=r"SAELens could not load it \(RuntimeError: Error\(s\) in loading "
                                             r"state_dict for StandardSAE:; size mismatch for W_dec: copying a param"):
        load_sae(bad)


def test_writers_no_prompt_reaches_are_said_and_bad_counts_refused(planted, planted_sae):
    """An expert no token of the prompts is routed to gave an empty table without a word (recorded in meta only);
    top=0 gave an empty table and top=2.5 failed inside torch's topk."""
    sae = load_sae(planted_sae)
    with pytest.warns(UserWarning, match=r"of the 8 writer\(s\) got no token of these prompts \(L1\.E\d"):
        report = expert_features(planted, sae, ["Hi there"], experts=[(1, e) for e in range(8)], skip_first=False)
    assert 0 < len(report.meta["writers_without_tokens"]) < 8
    for top, msg in ((0, "top must be an integer >= 1, got 0"), (2.5, "top must be an integer >= 1, got 2.5")):
        with pytest.raises(WorkbenchError, match=re.escape(msg)):
            expert_features(planted, sae, ["Hi there"], experts=[(1, 5)], top=top)
