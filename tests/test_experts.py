"""The profiler finds planted ground truth and agrees with independent computations."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import PROMPTS, ZOO_SPECS, assert_clear_routing, assert_json_close
from workbench.data import default_prompts
from workbench.experts.massive import histogram_median
from workbench.experts.profile import ProfileOptions, profile
from workbench.experts.super_experts import SuperExpertRule, explain, kurtosis, kurtosis_rows, select, shown
from workbench.experts.report import split
from workbench.io import dumps_json
from workbench.models.specs import load
from workbench.tracing.reducers import LogHistogram, Payload

CORPUS = default_prompts()[:24]


def plant(lm, layer, expert, channel, factor=500.0):
    """Scale one output row of one expert's down_proj (``workbench check``'s own helper); returns an undo function."""
    from workbench.check import output_row

    row = output_row(lm, layer, expert, channel)
    saved = row.clone()
    with torch.no_grad():
        row.mul_(factor)

    def undo():
        with torch.no_grad():
            row.copy_(saved)

    return undo


def reference_selection(experts: list[dict], num_layers: int, quantile=99.5, times=10, include_layers=0.75):
    """The reference script's selection (ZunhaiSu/Super-Experts-Profilling, eval_utils.py), transcribed:
    ``_super_experts_analysis`` keeps the entries of layers < round(total_layers * include_layers) whose
    module name holds "experts" (routed and shared experts; an expert that saw no token has no entry),
    ``_identify_super_experts`` admits output_max > np.percentile(v, quantile) and > np.max(v) // times."""
    include_layers = round(num_layers * include_layers)
    results = [e for e in experts if e["layer"] < include_layers and e["kind"] in ("routed", "shared")
               and not math.isnan(e["max_abs"])]
    output_max_values = [e["max_abs"] for e in results]
    percentile = np.percentile(output_max_values, quantile)
    chosen = [e for e in results
              if e["max_abs"] > percentile and e["max_abs"] > np.max(output_max_values) // times]
    chosen.sort(key=lambda e: e["max_abs"], reverse=True)
    return [(e["layer"], e["expert"], e["kind"]) for e in chosen]


def paper_selection(p: dict) -> list[tuple]:
    """The paper rule re-applied to a profile's expert maxima (no second pass)."""
    chosen, _, _ = select(p["experts"], p["meta"]["num_layers"], SuperExpertRule(rule="paper"),
                          p["massive_activations"]["layers"])
    return [(e["layer"], e["expert"], e["kind"]) for e in chosen]


def test_kurtosis_rows_match_plain_python():
    """The profile's kurtosis of channel maxima, all experts of a layer at once: each row's finite values only,
    NaN for fewer than two or no spread; equal to a plain-Python reference to rounding."""
    def ref(row):
        xs = [v for v in row if math.isfinite(v)]
        if len(xs) < 2:
            return math.nan
        mean = math.fsum(xs) / len(xs)
        var = math.fsum((v - mean) ** 2 for v in xs) / len(xs)
        return math.fsum((v - mean) ** 4 for v in xs) / len(xs) / var ** 2 if var > 0 else math.nan
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=g, dtype=torch.float64).abs()
    x[0, 3] = 40.0  # one outlier channel: large kurtosis
    x[1, :10] = math.inf
    x[2, 5] = math.nan
    x[3] = 2.0  # no spread
    x[4, 1:] = math.nan  # one finite value
    x[5, :] = -1.0  # nothing seen
    x[5, 7] = 3.0
    got = kurtosis_rows(x)
    for i, row in enumerate(x.tolist()):
        want = ref(row)
        assert (math.isnan(got[i]) and math.isnan(want)) or got[i] == pytest.approx(want, rel=1e-12), (i, got[i], want)
        assert kurtosis(x[i]) == got[i] or (math.isnan(got[i]) and math.isnan(kurtosis(x[i])))
    assert got[0] > 30 and math.isnan(got[3]) and math.isnan(got[4])


@pytest.mark.parametrize("spec", ZOO_SPECS)
def test_planted_super_expert_is_the_only_one(spec):
    # x5000: the planted row then writes 130-750x its layer's median |residual| into channel 17, a massive
    # activation; x500 reaches only 15x (qwen2-moe) and 22x (olmoe), which the default rule rejects (below).
    lm = load(spec)
    layer = next(i.index for i in lm.layer_infos() if i.kind == "moe")
    undo = plant(lm, layer, 5, 17, factor=5000.0)
    try:
        p = profile(lm, CORPUS, ProfileOptions(sinks=False), progress=False)
    finally:
        undo()
    found = [(e["layer"], e["expert"], e["kind"], e["channel"]) for e in p["super_experts"]]
    assert found == [(layer, 5, "routed", 17)]
    e = p["super_experts"][0]
    assert e["tokens_routed"] > 0 and CORPUS[e["prompt_index"]]  # located in a real prompt
    assert e["channel_kurtosis"] > 10  # one channel dominates this expert's output
    v = p["super_experts"][0]
    assert v["admitted"] and v["ratio_to_median"] > 1000 and v["ratio_to_next"] > 1000  # measured 2300-4300x
    assert v["residual_ratio_to_median"] > 100  # measured 131-750x
    assert paper_selection(p) == reference_selection(p["experts"], 4) == [(layer, 5, "routed")]


def test_weak_plant_stands_out_but_feeds_no_massive_activation():
    """x500 in zoo:qwen2-moe: the expert stands out (237x the median) but its output reaches only 15x the
    layer's median |residual| (its routing weight is small): the paper rule names it, the default does not."""
    lm = load("zoo:qwen2-moe")
    undo = plant(lm, 0, 5, 17, factor=500.0)
    try:
        p = profile(lm, CORPUS, ProfileOptions(sinks=False), progress=False)
    finally:
        undo()
    assert p["super_experts"] == []
    v = shown(p)[0]
    assert (v["layer"], v["expert"], v["stands_out"], v["feeds_massive"]) == (0, 5, True, False)
    assert v["residual_in_top"] and v["residual_ratio_to_median"] < 30
    assert explain(v, p["super_expert_rule"]).startswith("rejected")
    assert paper_selection(p) == [(0, 5, "routed")]


@pytest.fixture(scope="module")
def many_experts():
    """A random Qwen3-MoE with 64 experts, top-8 (the issue's 1024-hidden model, shrunk to build in 1 s)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from workbench.models.specs import LoadedModel, adapter_for

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, moe_intermediate_size=64, num_experts=64, num_experts_per_tok=8,
                         vocab_size=49152)
    model = Qwen3MoeForCausalLM(cfg).eval()
    return LoadedModel(model, load("zoo:qwen3-moe").tokenizer, adapter_for(model), "random-qwen3-moe-64")


@pytest.mark.parametrize("spec", ZOO_SPECS + ["zoo:tiny-moe", "many-experts"])
def test_models_without_a_super_expert_report_none(spec, many_experts):
    """Random zoo models, the trained tiny-moe and a 64-expert random model: the largest expert maximum is
    1.3-2.6x the median and 1.0-1.2x the next one (measured), so the default rule names none; the paper
    rule still names the largest, as the reference script does."""
    lm = many_experts if spec == "many-experts" else load(spec)
    p = profile(lm, CORPUS, ProfileOptions(sinks=False), progress=False)
    rule = p["super_expert_rule"]
    assert p["super_experts"] == [] and rule["rule"] == "default" and rule["candidate_layers"] == 3
    assert rule["candidates"] == sum(e["layer"] < 3 and e["kind"] != "dense" and e["tokens_routed"] > 0
                                     for e in p["experts"])  # routed + shared; DeepSeek's dense layer 0 is not one
    assert rule["top_ratio_to_median"] < 5 and rule["top_ratio_to_next"] < 1.5
    top = shown(p)[0]
    assert top["above_percentile"] and top["above_ratio"]  # the paper's conditions hold ...
    assert not top["stands_out"] and not top["feeds_massive"] and not top["admitted"]  # ... the others do not
    assert explain(top, rule).startswith("rejected")
    assert all(e["candidate"] is False for e in p["experts"] if e["layer"] >= 3 or e["kind"] == "dense")
    n = p["meta"]["num_layers"]
    assert paper_selection(p) == reference_selection(p["experts"], n) == [(top["layer"], top["expert"], top["kind"])]


def test_tiny_moe_se_default_and_paper_rules_find_the_planted_expert():
    p = profile(load("zoo:tiny-moe-se"), CORPUS, ProfileOptions(sinks=False), progress=False)
    assert [(e["layer"], e["expert"], e["channel"], e["position"]) for e in p["super_experts"]] == [(1, 5, 17, 0)]
    v = p["super_experts"][0]
    # measured: 27x the median, 12x the next, residual 202 = 90x the layer median at position 0
    assert v["ratio_to_median"] > 20 and v["ratio_to_next"] > 10 and v["residual_ratio_to_median"] > 60
    assert v["residual_position"] == 0
    assert paper_selection(p) == reference_selection(p["experts"], 4) == [(1, 5, "routed")]


def _synthetic(maxima: list[float]) -> list[dict]:
    """Candidates spread over layers 0-2 (the candidate layers of a 4-layer model)."""
    return [{"layer": i % 3, "expert": i // 3, "kind": "routed", "max_abs": m, "channel": 3,
             "position": 0, "prompt_index": 0, "token": "x"} for i, m in enumerate(maxima)]


def test_rule_on_synthetic_maxima():
    """Qwen3-30B-A3B's reported maxima (744, 540, 430, then 63.5) over a bulk of ordinary experts: the three
    stand out together (430 / 63.5 = 6.8x the next); the paper rule equals the reference on edge cases."""
    rng = np.random.default_rng(0)
    # 36 candidate layers x 128 experts, as in Qwen3-30B-A3B; a bulk with median ~22: 430 is ~19x it, and 63.5
    # is 1.6x the bulk's largest (no gap there)
    bulk = list(rng.uniform(5.0, 40.0, 36 * 128 - 4))
    experts = _synthetic([744.0, 540.0, 430.0, 63.5] + bulk)
    massive = [{"layer": l, "median_abs": 1.0, "top": [{"value": 500.0, "channel": 3, "position": 0,
                                                          "ratio_to_median": 500.0}]} for l in range(4)]
    chosen, facts, checks = select(experts, 4, SuperExpertRule(), massive)
    assert [e["max_abs"] for e in chosen] == [744.0, 540.0, 430.0] and facts["standing_out"] == 3
    assert checks[(2, "routed", 0)]["ratio_to_next"] == pytest.approx(430 / 63.5)  # 430 is expert 0 of layer 2
    assert checks[(0, "routed", 0)]["ratio_to_next"] == pytest.approx(744 / 63.5)  # the next one outside the group
    assert select(experts, 4, SuperExpertRule(), None)[0] == []  # no residual evidence: not admitted
    ref = lambda ex: reference_selection(ex, 4)  # noqa: E731
    paper = SuperExpertRule(rule="paper")
    for maxima in ([744.0, 540.0, 430.0, 63.5] + bulk, [0.0108, 0.0089, 0.0091, 0.0100] * 6, [5.0] * 24,
                   [9.5, 1.0, 1.2, 0.9] * 6, [12.0, 11.0, 1.0, 1.0] * 3, [3.0], list(rng.lognormal(0, 2, 256))):
        ex = _synthetic(maxima)
        got = [(e["layer"], e["expert"], e["kind"]) for e in select(ex, 4, paper, massive)[0]]
        assert got == ref(ex), maxima
    # an expert whose output overflowed (fp16: inf) is the largest there is; inf in the arithmetic made the
    # percentile and floor NaN, every comparison failed, and the planted expert of an fp16 run was dropped
    over = _synthetic([math.inf, 63.5] + bulk)
    for r in (SuperExpertRule(), paper):
        chosen, facts, checks = select(over, 4, r, massive)
        assert [e["max_abs"] for e in chosen] == [math.inf], r.rule
        assert facts["percentile_value"] == facts["percentile_value"] and facts["ratio_floor"] == 63.5


@pytest.mark.parametrize("spec", ["zoo:qwen2-moe", "zoo:qwen3-moe", "zoo:olmoe", "zoo:mixtral"])
def test_router_statistics_match_router_outputs(spec):
    lm = load(spec)
    assert_clear_routing(lm, PROMPTS, what=spec)  # counts and change rates compared exactly: no token on a tie
    p = profile(lm, PROMPTS, ProfileOptions(sinks=False, batch_size=3), progress=False)
    k = lm.summary()["top_k"]
    counts, probs, top1 = {}, {}, {}
    for text in PROMPTS:  # one prompt at a time: no padding anywhere
        ids = lm.tokenizer(text, return_tensors="pt").input_ids
        out = lm.model(ids, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            pr = torch.softmax(logits.double(), -1)
            idx = torch.topk(pr, k, -1).indices
            counts[layer] = counts.get(layer, 0) + torch.bincount(idx.flatten(), minlength=pr.shape[1])
            probs[layer] = probs.get(layer, 0) + pr.sum(0)
            top1.setdefault(layer, []).append(idx[:, 0])
    n = sum(len(lm.tokenizer(t).input_ids) for t in PROMPTS)
    for r in p["router"]:
        l = r["layer"]
        load_ref = counts[l].double() / counts[l].sum()
        torch.testing.assert_close(torch.tensor(r["load"], dtype=torch.float64), load_ref, rtol=0, atol=1e-6)
        assert abs(sum(r["load"]) - 1) < 1e-9 and r["tokens"] == n
        torch.testing.assert_close(torch.tensor(r["mean_prob"], dtype=torch.float64), probs[l] / n, rtol=1e-6,
                                   atol=1e-9)
        if l > 0:
            change = (torch.cat(top1[l]) != torch.cat(top1[l - 1])).double().mean().item()
            assert r["top1_change_rate"] == pytest.approx(change, abs=1e-12)
        co = torch.tensor(r["coactivation"])
        assert torch.equal(co.diagonal(), counts[l]) and torch.equal(co, co.T)


def test_deepseek_router_statistics_use_its_sigmoid_scores():
    """DeepSeek-V3 routes on sigmoid scores: the routing distribution is them, normalised per token."""
    lm = load("zoo:deepseek-v3")
    p = profile(lm, PROMPTS, ProfileOptions(sinks=False, batch_size=3), progress=False)
    layers = lm.adapter.decoder_layers(lm.model)
    sums, n = {}, 0
    for text in PROMPTS:  # a plain hook on each router, one prompt at a time
        ids = lm.tokenizer(text, return_tensors="pt").input_ids
        n += ids.shape[1]
        got = {}
        hooks = [lm.adapter.router(layers[r["layer"]]).register_forward_hook(
            lambda m, a, out, i=r["layer"]: got.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach()))
            for r in p["router"]]
        try:
            lm.model(ids)
        finally:
            for h in hooks:
                h.remove()
        for i, logits in got.items():
            s = torch.sigmoid(logits.reshape(-1, logits.shape[-1]).double())
            sums[i] = sums.get(i, 0) + (s / s.sum(-1, keepdim=True)).sum(0)
    assert p["router"] and all(r["scoring"] == "sigmoid" for r in p["router"])
    for r in p["router"]:
        torch.testing.assert_close(torch.tensor(r["mean_prob"], dtype=torch.float64), sums[r["layer"]] / n,
                                   rtol=1e-6, atol=1e-9)
        assert abs(sum(r["load"]) - 1) < 1e-9


@pytest.mark.parametrize("spec,scoring", [("zoo:deepseek-v3", "sigmoid"), ("zoo:qwen2-moe", "softmax")])
def test_contrast_probabilities_are_the_routers_own_scoring(spec, scoring):
    """contrast's per-prompt routing probability took a softmax of every router's logits; DeepSeek-V3 (and GLM-4.5)
    route on sigmoid scores, which the profile's mean_prob reads normalised per token. Both now read the same."""
    from workbench.experts.contrast import routing_by_prompt

    lm = load(spec)
    got = routing_by_prompt(lm, PROMPTS, batch_size=3, progress=False)
    layers = lm.adapter.decoder_layers(lm.model)
    for p, text in enumerate(PROMPTS):  # a plain hook on each router, one prompt at a time
        seen = {}
        hooks = [lm.adapter.router(layers[i]).register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach()))
            for i in got]
        try:
            lm.model(lm.tokenizer(text, return_tensors="pt").input_ids)
        finally:
            for h in hooks:
                h.remove()
        for i, logits in seen.items():
            x = logits.reshape(-1, logits.shape[-1]).double()
            s = x.softmax(-1) if scoring == "softmax" else torch.sigmoid(x) / torch.sigmoid(x).sum(-1, keepdim=True)
            torch.testing.assert_close(got[i][1][p], s.mean(0), rtol=1e-6, atol=1e-9)
    assert lm.adapter.router_scoring == scoring


def test_attention_sinks_match_eager_attentions():
    """Every statistic of the sink meter (batched, padded prompts) against each prompt's own eager attention: the
    mean over prompts of each head's per-prompt mean attention on key 0 and on its top key, how often the top key
    is key 0, and the counts."""
    lm = load("zoo:qwen3-moe")
    p = profile(lm, PROMPTS, ProfileOptions(batch_size=4), progress=False)
    assert lm.model.config._attn_implementation != "eager"  # restored after the pass
    lm.model.set_attn_implementation("eager")
    try:
        pos0, top, sure, maybe, prompts, queries = 0, 0, 0, 0, 0, 0
        for text in PROMPTS:
            ids = lm.tokenizer(text, return_tensors="pt").input_ids
            if ids.shape[1] < 2:
                continue
            att = lm.model(ids, output_attentions=True).attentions  # per layer [1, H, T, T]
            per_key = torch.stack([a[0, :, 1:, :].double().mean(1) for a in att])  # [L, H, T]: mean over queries
            pos0 = pos0 + per_key[..., 0]
            top = top + per_key.max(-1).values
            # key 0 on top, tie-aware: the meter sums in another order, so a near-tie may go either way
            rest = per_key[..., 1:].max(-1).values if per_key.shape[-1] > 1 else torch.full_like(per_key[..., 0], -1)
            sure = sure + (per_key[..., 0] > rest + 1e-9).double()
            maybe = maybe + (per_key[..., 0] >= rest - 1e-9).double()
            prompts += 1
            queries += ids.shape[1] - 1
    finally:
        lm.model.set_attn_implementation("sdpa")
    sinks = p["attention_sinks"]
    np.testing.assert_allclose(np.array(sinks["share_pos0"]), (pos0 / prompts).detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.array(sinks["share_top"]), (top / prompts).detach().numpy(), rtol=1e-5, atol=1e-7)
    got = torch.tensor(sinks["top_is_pos0"], dtype=torch.float64)
    assert bool(((sure / prompts <= got + 1e-12) & (got <= maybe / prompts + 1e-12)).all()) and bool((sure > 0).any())
    layers = len(sinks["prompts"])
    assert sinks["prompts"] == [prompts] * layers and sinks["queries"] == [queries] * layers


def test_a_learned_sinks_share_is_reported_beside_the_keys(tmp_path, zoo_tokenizer):
    """gpt-oss adds a learned sink column to each head's softmax and returns the probabilities without it (rows sum to
    0.64-0.99): its share of attention was nowhere. It is share_learned_sink, 1 minus the returned rows' mean sum, per
    layer and head (models without one do not get the key)."""
    from workbench.models.families import save_tiny

    lm = load(str(save_tiny("gpt_oss", tmp_path / "m", zoo_tokenizer)))
    p = profile(lm, PROMPTS, ProfileOptions(batch_size=4, qk=False), progress=False)["attention_sinks"]
    lm.model.set_attn_implementation("eager")
    mass, prompts = 0, 0
    for text in PROMPTS:
        ids = lm.tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            att = lm.model(ids, output_attentions=True).attentions
        mass = mass + torch.stack([a[0, :, 1:, :].double().sum(-1).mean(-1) for a in att])  # [L, H]
        prompts += 1
    learned = 1 - mass / prompts
    assert float(learned.min()) > 0.001  # the tiny model's sinks take a visible share
    np.testing.assert_allclose(np.array(p["share_learned_sink"]), learned.numpy(), rtol=1e-5, atol=1e-7)
    assert "share_learned_sink" not in profile(load("zoo:qwen3-moe"), PROMPTS[:4], ProfileOptions(qk=False),
                                               progress=False)["attention_sinks"]
    # bf16 probabilities' rows miss 1 by up to ~1e-3 (-3e-4 to 2e-4 on zoo:qwen3-moe): no learned sink for that; the
    # tiny gpt-oss's sinks (up to 0.15) still show
    assert "share_learned_sink" not in profile(load("zoo:qwen3-moe", dtype="bfloat16"), PROMPTS, ProfileOptions(
        qk=False), progress=False)["attention_sinks"]
    half = profile(load(str(tmp_path / "m"), dtype="bfloat16"), PROMPTS, ProfileOptions(batch_size=4, qk=False),
                   progress=False)["attention_sinks"]
    np.testing.assert_allclose(np.array(half["share_learned_sink"]), learned.numpy(), atol=0.02)


def test_massive_activation_top_entries_and_median():
    lm = load("zoo:mixtral")
    p = profile(lm, PROMPTS, ProfileOptions(sinks=False, top_massive=5), progress=False)
    hs = []
    for text in PROMPTS:
        ids = lm.tokenizer(text, return_tensors="pt").input_ids
        hs.append(lm.model(ids, output_hidden_states=True).hidden_states)
    for layer in p["massive_activations"]["layers"][:-1]:  # the last hidden state has the final norm applied
        l = layer["layer"]
        x = torch.cat([h[l + 1][0] for h in hs]).abs().double()
        ref = torch.topk(x.flatten(), 5).values
        torch.testing.assert_close(torch.tensor([t["value"] for t in layer["top"]], dtype=torch.float64), ref)
        exact = x.flatten().median().item()
        assert abs(layer["median_abs"] / exact - 1) < 0.025


def test_histogram_median_on_known_data():
    h = LogHistogram(lo=-6, hi=6, num_bins=1200)
    x = torch.logspace(-3, 3, 10001, dtype=torch.float64)[:, None]
    h.update(Payload(x, torch.arange(x.shape[0])))
    assert abs(histogram_median(h) / 1.0 - 1) < 0.012
    z = LogHistogram(lo=-6, hi=6, num_bins=1200)
    z.update(Payload(torch.zeros(5, 2), torch.arange(5)))
    assert histogram_median(z) == 0.0


def test_profile_cli_writes_tables_and_plots(tmp_path):
    out = tmp_path / "p"
    r = subprocess.run([sys.executable, "-m", "workbench", "profile", "zoo:qwen2-moe", "--text", PROMPTS[0],
                        "--text", PROMPTS[1], "--quiet", "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    p = json.loads((out / "profile.json").read_text())
    for key in ("super_experts", "router", "massive_activations", "attention_sinks", "meta", "super_expert_rule"):
        assert key in p
    assert p["meta"]["num_prompts"] == 2 and p["super_expert_rule"]["quantile"] == 99.5
    assert p["super_expert_rule"]["rule"] == "default" and p["super_experts"] == []  # a random model
    assert re.search(r"no super experts \(largest expert maximum is [\d.]+x the median\)", r.stdout)  # 2.6x here
    assert "largest candidate L" in r.stdout and "rejected" in r.stdout
    import pandas as pd

    experts = pd.read_parquet(out / "experts.parquet")
    assert set(experts.kind) == {"routed", "shared"} and len(experts) == 4 * 8 + 4
    assert experts.candidate.sum() == p["super_expert_rule"]["candidates"] > 0 and not experts.admitted.any()
    for name in ("expert_maxabs", "router_load", "massive_activations", "attention_sinks"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.html").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "workbench", "profile", "zoo:qwen2-moe", "--text", "x",
                          "--quantile", "150", "--out", str(tmp_path / "q")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: argument --quantile: must be a number in (0, 100]")
    assert not (tmp_path / "q").exists()


def test_smollm2_super_weight_and_attention_sink(smollm2):
    """SmolLM2's massive activation lives in channel 507; removing it weakens the attention sink."""
    prompts = default_prompts()[:40]
    base = profile(smollm2, prompts, ProfileOptions(top_massive=2), progress=False)
    assert [(e["layer"], e["kind"], e["channel"], e["position"]) for e in base["super_experts"]] == [(11, "dense", 507, 0)]
    v = base["super_experts"][0]
    # measured: 771x the median dense-MLP maximum, 44x the next (layer 2), residual 1.3e4x the layer median
    assert v["ratio_to_median"] > 300 and v["ratio_to_next"] > 20 and v["residual_ratio_to_median"] > 3000
    massive = [l for l in base["massive_activations"]["layers"] if l["massive"]]
    assert massive[0]["layer"] == 11 and massive[0]["top"][0]["channel"] == 507

    def zero_507(mod, args, out):
        out = out.clone()
        out[..., 507] = 0
        return out

    hooks = [layer.mlp.down_proj.register_forward_hook(zero_507) for layer in smollm2.model.model.layers]
    try:
        ablated = profile(smollm2, prompts, ProfileOptions(top_massive=2), progress=False)
    finally:
        for h in hooks:
            h.remove()
    share = lambda p: np.array(p["attention_sinks"]["share_pos0"])[12:].mean()  # noqa: E731
    peak = lambda p: max(l["top"][0]["value"] for l in p["massive_activations"]["layers"][:-1])  # noqa: E731
    assert share(base) > 0.65 and share(ablated) < 0.5 * share(base)  # measured 0.73 -> 0.33
    assert peak(ablated) < peak(base) / 10  # 2.6e4 -> 1.8e3 (what is left sits in layer 28, channel 199)


@pytest.mark.parametrize("spec", ["zoo:qwen2-moe", "zoo:deepseek-v3"])
def test_padding_changes_no_statistic(spec):
    """Profiles in batches of 4 (right-padded) equal profiles one prompt at a time."""
    lm = load(spec)
    prompts = CORPUS[:9]
    assert_clear_routing(lm, prompts, what=spec)  # router counts compared exactly: no token on a tie
    a = profile(lm, prompts, ProfileOptions(batch_size=4), progress=False)
    b = profile(lm, prompts, ProfileOptions(batch_size=1), progress=False)
    # The padded batch runs the matmuls at other shapes: every number agrees to fp32 tolerance, and where
    # a maximum's location differs the two values must agree (a near-tie broken the other way by rounding;
    # seen on zoo:qwen2-moe L3.E6 between tokens of different prompts, so equal contexts are not required).
    pa, pb = (json.loads(dumps_json(split(x)[0])) for x in (a, b))
    assert (pa["meta"].pop("batch_size"), pb["meta"].pop("batch_size")) == (4, 1)
    assert_json_close(pa, pb)
