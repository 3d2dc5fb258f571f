"""Inputs nobody picked, from a newcomer's sweep of the CLI: checkpoints whose config does not match their weights,
reruns into an old output folder, options that select nothing, prompts a model cannot measure. Each must give one
line naming the problem (or just work), never a traceback, random weights or another run's files."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from helpers import one_error
from workbench.errors import WorkbenchError
from workbench.models.specs import load


def edited(saved_dir, tmp_path, **changes):
    """A copy of the saved zoo:qwen2-moe folder with config.json fields changed (None removes one)."""
    d = tmp_path / "edited"
    shutil.copytree(saved_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# ----- checkpoints whose config does not match their weights ---------------------------------------------------

def test_a_config_with_more_layers_than_the_weights_is_refused_not_filled_with_random_layers(saved_dir, tmp_path):
    cfg = json.loads((saved_dir / "config.json").read_text())
    d = edited(saved_dir, tmp_path, num_hidden_layers=cfg["num_hidden_layers"] + 2, layer_types=None)
    first_missing = rf"model\.layers\.{cfg['num_hidden_layers']}\."
    with pytest.raises(WorkbenchError, match=rf"no weights for \d+ parameter.*{first_missing}"):
        load(str(d))


def test_a_config_whose_shapes_do_not_fit_the_weights_names_the_first_weight(saved_dir, tmp_path, capsys):
    cfg = json.loads((saved_dir / "config.json").read_text())
    d = edited(saved_dir, tmp_path, hidden_size=2 * cfg["hidden_size"])
    with pytest.raises(WorkbenchError, match=r"do not fit the shapes config\.json declares \(first: .*on disk"):
        load(str(d))
    assert "MISMATCH" not in capsys.readouterr().err  # transformers' load table stays out of the one-line error


@pytest.mark.parametrize("k", [0, 9])
def test_a_top_k_outside_the_experts_is_refused(saved_dir, tmp_path, k):
    cfg = json.loads((saved_dir / "config.json").read_text())
    assert cfg["num_experts"] == 8  # (9 is one more than there are)
    d = edited(saved_dir, tmp_path, num_experts_per_tok=k)
    with pytest.raises(WorkbenchError, match=f"routes each token to {k} of its 8 experts"):
        load(str(d))


# ----- reruns into an old folder -------------------------------------------------------------------------------

def test_a_profile_rerun_removes_the_old_runs_plots_and_tables(run, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\nHello there, how are you\n")
    out = tmp_path / "prof"
    code, _, err = run("profile", "zoo:qwen2-moe", "--prompts", prompts, "--out", out, "--quiet")
    assert code == 0, err
    assert (out / "attention_sinks.png").is_file() and (out / "attention_sinks.parquet").is_file()
    (out / "notes.png").write_bytes(b"mine")  # not the profile's: stays
    code, _, err = run("profile", "zoo:qwen2-moe", "--prompts", prompts, "--out", out, "--quiet", "--no-sinks",
                       "--no-plots")
    assert code == 0, err
    listed = set(json.loads((out / "run.json").read_text())["outputs"])
    left = {p.name for p in out.iterdir()} - {"report.html"}
    assert left == listed | {"notes.png"}, left ^ listed
    assert not (out / "attention_sinks.png").exists() and not (out / "attention_sinks.parquet").exists()
    assert "attention_sinks" not in (out / "report.html").read_text()


# ----- options that select nothing, or something the model lacks ----------------------------------------------

def test_trace_applies_expert_counts_to_the_router_sites_only(run, tmp_path):
    """The README's example: expert_counts beside absmax and moments over experts, shared experts and routers."""
    out = tmp_path / "t"
    code, _, err = run("trace", "zoo:qwen2-moe", "--text", "hello there", "--components",
                       "expert,shared_expert,router", "--reducers", "absmax,moments,expert_counts", "--out", out,
                       "--quiet")
    assert code == 0, err
    sites = json.loads((out / "trace.json").read_text())["sites"]
    for key, reds in sites.items():
        assert ("expert_counts" in reds) == (".router" in key), key
        assert {"absmax", "moments"} <= set(reds), key
    code, _, err = run("trace", "zoo:qwen2-moe", "--text", "hi", "--components", "expert", "--reducers",
                       "expert_counts", "--out", tmp_path / "t2")
    one_error(code, err, "expert_counts applies to none of the selected sites", "--components router")
    # where adding the router cannot help, the hint says why (it told a dense model's user to add it)
    for argv, why in ((["smollm2-135m", "--components", "resid_pre,router"], "the model is dense"),
                      (["zoo:deepseek-v3", "--components", "resid_pre,router", "--layers", "0"],
                       "the selected layers have none: dense layers")):
        code, _, err = run("trace", *argv, "--text", "hi", "--reducers", "absmax,expert_counts", "--quiet", "--out",
                           tmp_path / "t3")
        one_error(code, err, "expert_counts applies to none of the selected sites (it needs a router site", why)
        assert "add --components" not in err
    assert not (tmp_path / "t2").exists()


def test_trace_names_what_a_dense_model_lacks_and_an_empty_reducer_list(run, tmp_path):
    code, _, err = run("trace", "smollm2-135m", "--text", "hi", "--components", "router", "--out", tmp_path / "o")
    one_error(code, err, "no router sites", "no MoE layer", "dense")
    code, _, err = run("trace", "smollm2-135m", "--text", "hi", "--components", "mlp_out,router", "--out",
                       tmp_path / "o2", "--quiet")  # one command over many models: the others are traced, with a word
    assert code == 0 and "warning: no router sites: smollm2-135m has no MoE layer (a dense model)" in err, err
    code, _, err = run("trace", "zoo:mixtral", "--text", "hi", "--components", "shared_expert", "--out",
                       tmp_path / "o")
    one_error(code, err, "no shared_expert sites", "no shared expert")
    code, _, err = run("trace", "zoo:deepseek-v3", "--text", "hi", "--components", "router", "--layers", "0", "--out",
                       tmp_path / "o")  # the model has MoE layers; this one is dense
    one_error(code, err, "no router sites: layer 0 of zoo:deepseek-v3 has no MoE block (dense)")
    for layers, said in (("1,3", "layers 1,3 of zoo:qwen3-moe have no shared expert"),
                         ("2", "layer 2 of zoo:qwen3-moe has no shared expert")):
        code, _, err = run("trace", "zoo:qwen3-moe", "--text", "hi", "--components", "shared_expert,router",
                           "--layers", layers, "--quiet", "--out", tmp_path / "o3")
        assert code == 0 and f"warning: no shared_expert sites: {said}" in err, err
    code, _, err = run("trace", "zoo:qwen2-moe", "--text", "hi", "--reducers", "", "--out", tmp_path / "o")
    one_error(code, err, "--reducers names no reducer")
    assert not (tmp_path / "o").exists()
    assert json.loads((tmp_path / "o2" / "trace.json").read_text())["sites"]


def test_reduce_rejects_an_unknown_or_missing_device_in_one_line(run, tmp_path):
    for device, needle in (("banana", "unknown device 'banana'"),) + (
            () if torch.cuda.is_available() else (("cuda", "CUDA is not available"),)):
        code, _, err = run("reduce", tmp_path, "--out", tmp_path / "r.json", "--device", device)
        one_error(code, err, needle)


def test_report_names_a_corrupt_file(run, tmp_path):
    prof = tmp_path / "prof"
    prof.mkdir()
    (prof / "profile.json").write_text('{"experts": [{"layer": 0, ')
    code, _, err = run("report", prof)
    one_error(code, err, "profile.json is corrupt or incomplete")
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.resolved.yaml").write_text("name: s\nconditions: []\n")
    (study / "results.csv").write_text("")
    code, _, err = run("report", study)
    one_error(code, err, "results.csv is corrupt or incomplete")
    (study / "results.csv").write_text("a,b\n1,2\n")
    code, _, err = run("report", study)
    one_error(code, err, "results.csv is corrupt or incomplete", "no column 'condition'")


def test_a_domain_name_cannot_name_a_path(run, tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("hello\n")
    for name in ("a/b", "../up", ".hidden"):
        code, _, err = run("profile", "zoo:olmoe", "--prompts", f, "--domains", f"{name}={f}", "--out", tmp_path / "o")
        one_error(code, err, "--domains name", "path separators")
    assert not (tmp_path / "o").exists()


# ----- prompts the model cannot measure -------------------------------------------------------------------------

def test_welch_has_no_test_for_one_prompt_a_side():
    from workbench.experts.contrast import _welch

    t, p = _welch(torch.tensor([0.5]), torch.tensor([0.1, 0.2, 0.3]))
    assert math.isnan(t) and math.isnan(p)
    t, p = _welch(torch.tensor([0.5, 0.7]), torch.tensor([0.1, 0.2, 0.3]))
    assert math.isfinite(t) and 0 < p < 1


def test_contrast_with_one_prompt_a_side_says_its_p_values_are_nan(run, tmp_path):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("a\n")
    neg.write_text("def\n")
    code, out, err = run("contrast", "zoo:qwen2-moe", "--positive", pos, "--negative", neg, "--out", tmp_path / "c",
                         "--quiet")
    assert code == 0, err
    assert "p-values are NaN" in err
    import pandas as pd

    assert pd.read_csv(tmp_path / "c" / "contrast.csv").p_value.isna().all()


def test_attention_sinks_of_single_token_prompts_are_not_measured(run, tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("a\nb\n")
    code, out, err = run("profile", "zoo:qwen2-moe", "--prompts", f, "--out", tmp_path / "p", "--quiet")
    assert code == 0, err
    assert "attention sinks: not measured (no prompt has 2 tokens or more)" in out
    sinks = json.loads((tmp_path / "p" / "profile.json").read_text(), parse_constant=lambda c: c)["attention_sinks"]
    assert sinks["queries"] == [0] * len(sinks["queries"])
    assert all(v == "NaN" for row in sinks["share_pos0"] for v in row)  # not 0.0: nothing was measured
    assert "not measured" in (tmp_path / "p" / "report.html").read_text()


def test_a_prompts_file_splits_at_newlines_only(tmp_path):
    from workbench.data import read_prompts

    f = tmp_path / "p.txt"
    f.write_bytes("one\x0cpage\r\ntwo\u2028lines\n\n  \nthree".encode())
    assert read_prompts(f) == ["one\x0cpage", "two\u2028lines", "three"]
    f.write_text("\n  \n")
    with pytest.raises(WorkbenchError, match="only blank lines"):
        read_prompts(f)


def test_a_jsonl_prompts_file_reads_its_prompt_fields(tmp_path):
    from workbench.data import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "The capital of France is"}\n\n"a plain string"\n{"text": "two\\nlines", "id": 3}\n')
    assert read_prompts(f) == ["The capital of France is", "a plain string", "two\nlines"]
    f.write_text('{"prompt": "ok"}\n{"answer": " Paris"}\n')
    with pytest.raises(WorkbenchError, match=r"p\.jsonl line 2: expected a string or an object"):
        read_prompts(f)
    f.write_text('{"prompt": "ok"\n')
    with pytest.raises(WorkbenchError, match=r"p\.jsonl line 1: not JSON"):
        read_prompts(f)


def test_a_quantile_given_as_a_fraction_is_flagged(run, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("hello there\n")
    code, _, err = run("profile", "zoo:qwen2-moe", "--prompts", f, "--quantile", "0.995", "--no-sinks", "--no-plots",
                       "--out", tmp_path / "p", "--quiet")
    assert code == 0 and "--quantile is a percentile (0-100]: 0.995 is the 0.995th percentile, not the 99.5th" in err


def test_ablate_reads_the_studys_texts_file_before_loading_the_model(run, tmp_path, monkeypatch):
    import workbench.cli as cli

    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\nmetrics: [perplexity]\ntexts: {tmp_path / 'missing.txt'}\nconditions: []\n")
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded before the texts were read"))
    code, _, err = run("ablate", "zoo:qwen2-moe", "--study", study, "--out", tmp_path / "o")
    one_error(code, err, "missing.txt")
    assert not (tmp_path / "o").exists()


def test_a_share_gets_wilsons_interval_within_0_and_1():
    from workbench.metrics import mean_ci

    m, lo, hi, n = mean_ci([1, 1, 1, 0], share=True)  # 3 of 4: Wilson's 95 % interval is [0.3006, 0.9544]
    assert (m, n) == (0.75, 4) and lo == pytest.approx(0.30064, abs=1e-5) and hi == pytest.approx(0.95441, abs=1e-5)
    assert mean_ci([0] * 10, share=True)[1:3] == (0.0, pytest.approx(0.27754, abs=1e-5))  # never below 0
    assert mean_ci([1] * 12, share=True)[1:3] == (pytest.approx(0.75750, abs=1e-5), 1.0)
    _, lo, hi, _ = mean_ci([1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], share=True)  # 11 of 12: the normal interval passes 1
    assert 0 < lo < hi < 1
    with pytest.raises(ValueError, match="0 or 1"):
        mean_ci([0.5, 1.0], share=True)


def test_a_mean_gets_students_t_interval():
    """Not a share: the mean +- t(n - 1) standard errors. It was the normal 1.96 whatever n, which at n = 2 made the
    interval 6.5 times too narrow (t = 12.71) and at the 5-12 texts of a small study 10-40 % too narrow."""
    from workbench.metrics import mean_ci, t_quantile

    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281, 23: 2.0687, 30: 2.0423,
             100: 1.9840, 301: 1.9679, 1000: 1.9623}  # t(0.975, df), printed tables
    for df, t in table.items():
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4), df
    assert t_quantile(0.995, 9) == pytest.approx(3.2498, abs=1e-4) and t_quantile(0.95, 15) == pytest.approx(1.7531,
                                                                                                            abs=1e-4)
    m, lo, hi, n = mean_ci([2.0, 4.0])
    assert (m, n) == (3.0, 2) and (lo, hi) == (pytest.approx(3.0 - 12.7062, abs=1e-4), pytest.approx(3.0 + 12.7062,
                                                                                                      abs=1e-4))
    values = [1.0, 2.0, 4.0, 8.0, 16.0]  # mean 6.2, sample variance 148.8 / 4
    _, lo, hi, _ = mean_ci(values)
    assert (lo, hi) == (pytest.approx(6.2 - 2.7764 * 37.2 ** 0.5 / 5 ** 0.5, abs=1e-3),
                        pytest.approx(6.2 + 2.7764 * 37.2 ** 0.5 / 5 ** 0.5, abs=1e-3))
    assert mean_ci(values, level=0.99)[2] > hi and mean_ci(values, bounds=(0, 10))[1:3] == (0, 10)
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match="level"):
            mean_ci(values, level=bad)
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0.975, 0)


def test_values_that_happen_to_be_0_or_1_are_no_share():
    """The baseline's KL is exactly 0 on every text; it once got Wilson's interval ([0, 0.138] over 24 texts, wider
    than a real condition's), as would any metric whose values all came out 0 or 1. Whether a metric is a share is
    the metric's own property."""
    from workbench.metrics import SHARE_METRICS, mean_ci
    from workbench.studies import Condition, _row

    assert mean_ci([0.0] * 24)[1:] == (0.0, 0.0, 24) and mean_ci([1.0])[1:] == (1.0, 1.0, 1)
    row = _row(Condition("baseline", []), "kl", [0.0] * 24)
    assert (row["mean"], row["ci_low"], row["ci_high"]) == (0.0, 0.0, 0.0)
    assert _row(Condition("c", []), "accuracy", [0.0] * 24)["ci_high"] == pytest.approx(0.13798, abs=1e-5)
    assert set(SHARE_METRICS) == {"accuracy", "passkey", "override", "label_copy", "recall"}


def test_a_metrics_interval_stays_in_what_its_values_can_be():
    """Perplexities of a few texts far apart gave a normal interval reaching below 0 (a perplexity is >= 1); KLs
    near 0, one below 0. A study's row cuts the interval to the metric's range; the mean itself is untouched."""
    from workbench.studies import Condition, _row

    ppl = [1.5, 1.6, 1.4, 40.0]
    row = _row(Condition("c", []), "perplexity", ppl)
    assert row["mean"] == pytest.approx(sum(ppl) / 4) and row["ci_low"] == 1.0
    assert row["ci_high"] == pytest.approx(11.125 + 3.1824 * 19.25 / 2, rel=1e-3)  # the upper end: t(3) = 3.18
    assert _row(Condition("c", []), "kl", [0.0, 0.0, 0.0, 0.9])["ci_low"] == 0.0
    sink = _row(Condition("c", []), "sink", [0.99, 0.2, 0.99, 0.99])
    assert sink["ci_high"] == 1.0 and 0 < sink["ci_low"] < sink["mean"]
    massive = _row(Condition("c", []), "massive", [1.0, 1.0, 900.0])
    assert massive["ci_low"] == 0.0
    wide = _row(Condition("c", []), "passkey_unknown_metric", [-5.0, 5.0])  # a metric of no known range: as before
    assert wide["ci_low"] < -5


def _circuit_file(path, n_edges_total=10, model="zoo:a", score=1.0, port="in", repeat=1):
    path.write_text(json.dumps({"nodes": [{"id": "input", "kind": "input", "layer": -1, "index": -1},
                                          {"id": "logits", "kind": "logits", "layer": 1, "index": -1}],
                                "edges": [{"source": "input", "target": "logits", "port": port,
                                           "score": score}] * repeat,
                                "graph": {"meta": {"model": model, "n_edges_total": n_edges_total}}}))
    return path


def test_circuit_diff_names_what_is_wrong_with_a_file(run, tmp_path):
    a = _circuit_file(tmp_path / "a.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    (tmp_path / "folder").mkdir()
    _circuit_file(tmp_path / "folder" / "circuit.json")
    cases = [(tmp_path / "bin.json", "is not UTF-8 text"), (tmp_path / "folder", "is a folder (give "),
             (tmp_path / "list.json", "the top level is a list, not an object"),
             (_circuit_file(tmp_path / "s.json", score="high"), "has a non-numeric score 'high'"),
             (_circuit_file(tmp_path / "n.json", score=None), "has a non-numeric score None"),
             # a hand-edited file: a port no graph has, an edge twice (a graph keeps one; the diff counted both)
             (_circuit_file(tmp_path / "p.json", port="x"),
              "edge 0 (input -> logits) has port 'x'; ports: q, k, v, in, internal"),
             (_circuit_file(tmp_path / "d.json", repeat=2), "edge 1 repeats input -> logits (port in)")]
    for path, needle in cases:
        code, _, err = run("circuit-diff", a, path)
        one_error(code, err, path.name, needle)
    code, _, err = run("circuit-diff", a, a, "--out", a / "x.json")
    one_error(code, err, "a.json exists and is not a directory")


def test_circuit_diff_warns_when_the_graphs_differ(run, tmp_path):
    a, b = _circuit_file(tmp_path / "a.json"), _circuit_file(tmp_path / "b.json", n_edges_total=12, model="zoo:b")
    code, out, err = run("circuit-diff", a, b)
    assert code == 0 and "Jaccard 1.000" in out
    assert "warning: the circuits come from graphs of 10 and 12 edges (zoo:a and zoo:b)" in err
    code, _, err = run("circuit-diff", a, _circuit_file(tmp_path / "c.json", model="zoo:a@3"))  # a checkpoint series
    assert code == 0 and "warning" not in err


def test_check_does_not_fail_the_planted_expert_of_a_two_layer_model(short_gpt2):
    from workbench.check import PROMPTS, _planted

    (check,) = _planted(load(str(short_gpt2)), PROMPTS)
    assert check.ok is None and "2 experts (MLPs) in all" in check.detail, check


@pytest.mark.parametrize("kl,ok", [(-4.61e-8, True), (2.41e-8, True), (-1e-3, False), (float("nan"), False)])
def test_check_judges_the_study_kl_to_float_rounding(monkeypatch, kl, ok):
    """A zero that barely moves the model gives a KL of ~1e-8 of either sign (the README's own sample printed
    -4.61e-08); `check` required >= 0 exactly, so it could fail on a machine whose rounding went the other way."""
    import pandas as pd

    from workbench import studies
    from workbench.check import _study

    rows = [("baseline", "perplexity", 10.0), ("zero", "perplexity", 10.0), ("baseline", "kl", 0.0), ("zero", "kl", kl)]
    table = pd.DataFrame(rows, columns=["condition", "metric", "mean"])
    monkeypatch.setattr(studies.Study, "run", lambda *a, **k: table)
    (check,) = _study(load("zoo:qwen2-moe"), None)
    assert check.ok is ok, check


def test_profile_says_over_how_many_layers_the_sink_share_is(run, tmp_path, zoo_tokenizer):
    """Jamba's Mamba layers were called "linear-attention layers" in the summary line, beside a mean over the
    others that did not say it was one."""
    from workbench.models.families import save_tiny

    d = save_tiny("jamba", tmp_path / "jamba", zoo_tokenizer)
    code, out, err = run("profile", d, "--text", "The capital of France is Paris.", "--no-plots", "--quiet", "--out",
                         tmp_path / "p")
    assert code == 0, err
    assert "(over 2 of 4 layers: 2 have no softmax attention)" in out and "linear-attention" not in out


def test_profile_says_which_layers_lost_their_sink_share_to_non_finite_values(run, tmp_path, zoo_tokenizer):
    """An fp16 overflow made some layers' sink shares NaN: the summary's mean was over the rest (0.12 against 0.52)
    and did not say so."""
    import torch
    from transformers import AutoModelForCausalLM

    from workbench.models.families import save_tiny

    d = save_tiny("llama", tmp_path / "m", zoo_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 0] = float("inf")  # as an overflow would, from layer 1 on
    model.save_pretrained(d)
    code, out, err = run("profile", d, "--text", "The capital of France is Paris.", "--no-plots", "--quiet", "--out",
                         tmp_path / "p")
    assert code == 0, err
    assert "(over 2 of 4 layers: layer(s) 2, 3 are NaN: non-finite activations there)" in out, out
    assert "warning: non-finite activations from layer 1" in err


def test_sink_shares_leave_out_prompts_whose_attention_is_not_finite(run, tmp_path, zoo_tokenizer):
    """One prompt whose activations overflow (here: an inf embedding row for a word only it has) made every layer's
    sink shares NaN for all prompts. It is now left out of each layer it reaches, and counted; the others' shares
    are what they are without it."""
    from transformers import AutoModelForCausalLM

    from workbench.experts.profile import ProfileOptions, profile
    from workbench.models.families import save_tiny

    d = save_tiny("llama", tmp_path / "m", zoo_tokenizer)
    clean = ["The capital of France is Paris.", "Water boils at one hundred degrees."]
    bad = "A zebra ran through the field at dawn."
    word = zoo_tokenizer(" zebra", add_special_tokens=False)["input_ids"][0]
    assert all(word not in zoo_tokenizer(t)["input_ids"] for t in clean)
    model = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        model.get_input_embeddings().weight[word] = float("inf")
    model.save_pretrained(d)
    lm = load(str(d))
    options = ProfileOptions(batch_size=4, qk=False)
    mixed = profile(lm, [*clean, bad], options, progress=False)["attention_sinks"]
    alone = profile(lm, clean, options, progress=False)["attention_sinks"]
    layers = len(alone["share_pos0"])
    assert mixed["nonfinite_prompts"] == [1] * layers and "nonfinite_prompts" not in alone
    assert mixed["prompts"] == alone["prompts"] and mixed["queries"] == alone["queries"]
    for key in ("share_pos0", "share_top", "top_is_pos0"):  # other batch shapes and padding: float32 sums differ
        assert torch.allclose(torch.tensor(mixed[key]), torch.tensor(alone[key]), atol=1e-5), key
    code, out, err = run("profile", d, "--text", clean[0], "--text", clean[1], "--text", bad, "--no-plots", "--quiet",
                         "--out", tmp_path / "p")
    assert code == 0, err
    assert "attention sinks: prompts with non-finite attention left out (L0: 1, L1: 1" in err, err
    assert "attention sinks: mean share on position 0" in out and "are NaN" not in out, out


def test_vocab_predicted_on_a_dense_model_is_said_to_measure_nothing(tmp_path, zoo_tokenizer):
    """The README says --vocab-predicted with --offload layers is refused; on a dense model (smollm2-135m, the one
    built-in spec offload takes) it was neither refused nor said: the flag silently did nothing."""
    from workbench.experts.profile import ProfileOptions, profile
    from workbench.models.families import save_tiny

    lm = load(str(save_tiny("llama", tmp_path / "m", zoo_tokenizer)))
    with pytest.warns(UserWarning, match="has no MoE router: --vocab-predicted .* has nothing to measure"):
        profile(lm, ["The capital of France is Paris."], ProfileOptions(vocab_predicted=True, sinks=False, qk=False),
                progress=False)
