"""Ablation studies: validated before model work, complete tables, reproducible, resumable."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from workbench import metrics as M
from workbench.errors import WorkbenchError
from workbench.models.specs import load
from workbench.studies import Study

SMALL = {"name": "t", "num_texts": 6, "seeds": [0, 1], "max_new_tokens": 4,
         "metrics": ["perplexity", "accuracy", "sink", "massive", "kl", "generations"],
         "generation_prompts": ["The capital of France is"],
         "conditions": [{"name": "drop L1 E3", "interventions": [{"op": "drop", "layers": 1, "expert": 3}]},
                        {"generate": "each_super_expert"}, {"generate": "random_experts", "k": 1}]}


@pytest.fixture(scope="module")
def planted():
    """zoo:qwen3-moe with a planted super expert (layer 0, expert 5, channel 17)."""
    lm = load("zoo:qwen3-moe")
    with __import__("torch").no_grad():
        lm.adapter.experts(lm.adapter.decoder_layers(lm.model)[0]).down_proj[5][17] *= 500.0
    return lm


def test_study_table_and_resolution(planted, tmp_path):
    df = Study(SMALL).run(planted, tmp_path, progress=False)
    conds = list(dict.fromkeys(df.condition))
    assert conds == ["baseline", "drop L1 E3", "super L0.R5", "random x1 seed 0", "random x1 seed 1"]
    num = df[df.metric != "generations"]
    assert (num.groupby("condition").size() == 5).all()
    assert ((num.ci_low <= num["mean"] + 1e-12) & (num["mean"] <= num.ci_high + 1e-12)).all()
    base = num[num.condition == "baseline"].set_index("metric")["mean"]
    assert base["kl"] == 0 and base["perplexity"] > 1
    assert (num[(num.condition != "baseline") & (num.metric == "kl")]["mean"] > 0).all()
    assert len(df[df.metric == "generations"]) == len(conds)
    # The resolved study spells every condition out and reproduces them.
    resolved = yaml.safe_load((tmp_path / "study.resolved.yaml").read_text())
    assert (resolved["model"], resolved["dtype"], resolved["device"]) == (planted.spec, "float32", "cpu")  # provenance
    names = [c["name"] for c in resolved["conditions"]]
    assert names == conds[1:]  # the baseline is implicit
    random0 = resolved["conditions"][2]["interventions"]
    assert len(random0) == 1 and random0[0]["layers"] == [0] and random0[0]["expert"] != 5
    rerun = Study.from_file(tmp_path / "study.resolved.yaml")  # runs unchanged: same conditions, no profiling
    assert [c.to_dict() for c in rerun.resolve(planted)] == [c.to_dict() for c in Study(SMALL).resolve(planted)]
    again = pd.read_csv(tmp_path / "results.csv")
    assert list(again.condition) == list(df.condition)


def test_interrupted_study_resumes(planted, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = M.text_metrics

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(M, "text_metrics", flaky)
    spec = dict(SMALL, conditions=SMALL["conditions"][:1] + [{"name": "zero L2 E1",
                                                              "interventions": [{"op": "zero", "layers": 2, "expert": 1}]}],
                metrics=["perplexity", "kl"])
    with pytest.raises(KeyboardInterrupt):
        Study(spec).run(planted, tmp_path, progress=False)
    saved = sorted(p.name for p in (tmp_path / "conditions").iterdir())
    assert saved == ["baseline.json", "drop_L1_E3.json"] and not (tmp_path / "results.csv").exists()
    monkeypatch.setattr(M, "text_metrics", real)
    df = Study(spec).run(planted, tmp_path, progress=False)
    assert list(dict.fromkeys(df.condition)) == ["baseline", "drop L1 E3", "zero L2 E1"]
    fresh = Study(spec).run(planted, tmp_path / "fresh", progress=False)
    pd.testing.assert_frame_equal(df.drop(columns="seconds"), fresh.drop(columns="seconds"))


def test_a_rerun_into_an_old_folder_leaves_nothing_of_the_old_run(planted, tmp_path, monkeypatch):
    """Another study run into a finished study's folder once kept its results.png (generations only: nothing
    plotted; the report showed the old plot), its conditions' files, and while it ran (or after it was killed) its
    complete results beside the new study.resolved.yaml."""
    from workbench.report import report

    two = dict(SMALL, metrics=["perplexity", "kl"], seeds=[0], conditions=SMALL["conditions"][:1] + [
        {"name": "zero L2 E1", "interventions": [{"op": "zero", "layers": 2, "expert": 1}]}])
    Study(two).run(planted, tmp_path, progress=False)
    assert (tmp_path / "results.png").exists() and (tmp_path / "conditions" / "zero_L2_E1.json").exists()
    gens = dict(SMALL, metrics=["generations"], conditions=SMALL["conditions"][:1])

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(M, "generations", killed)
    with pytest.raises(KeyboardInterrupt):
        Study(gens).run(planted, tmp_path, progress=False)
    assert not list(tmp_path.glob("results.*"))  # nothing passes for this run's results
    monkeypatch.undo()
    Study(gens).run(planted, tmp_path, progress=False)
    assert not (tmp_path / "results.png").exists()
    assert sorted(p.name for p in (tmp_path / "conditions").iterdir()) == ["baseline.json", "drop_L1_E3.json"]
    page = report(tmp_path).read_text()
    assert "metrics: generations." in page and "no baseline" not in page and "<img" not in page


def test_a_generations_only_study_prints_no_empty_table(run, tmp_path):
    study = tmp_path / "g.yaml"
    study.write_text(yaml.safe_dump({"metrics": ["generations"], "max_new_tokens": 2, "generation_prompts": ["Hi"],
                                     "conditions": [{"name": "z", "interventions": [{"op": "zero", "layers": 1,
                                                                                      "expert": 1}]}]}))
    code, out, err = run("ablate", "zoo:qwen3-moe", "--study", study, "--quiet", "--out", tmp_path / "o")
    assert code == 0, err
    assert "Empty DataFrame" not in out and "[z] 'Hi -> " in out
    assert f"wrote {tmp_path / 'o' / 'results.csv'}, results.parquet and study.resolved.yaml" in out


def test_planted_super_expert_ablation_beats_random_controls(planted):
    df = Study(dict(SMALL, metrics=["perplexity", "kl", "massive"], seeds=[0, 1, 2], conditions=[
        {"generate": "each_super_expert"}, {"generate": "random_experts", "k": 1}])).run(planted, progress=False)
    kl = df[df.metric == "kl"].set_index("condition")["mean"]
    assert kl["super L0.R5"] > 0
    assert all(kl["super L0.R5"] > 5 * kl[f"random x1 seed {s}"] for s in (0, 1, 2))
    massive = df[df.metric == "massive"].set_index("condition")["mean"]
    assert massive["super L0.R5"] < massive["baseline"] / 2  # the planted outlier is gone (0.45 -> 0.19)
    assert all(massive[f"random x1 seed {s}"] > 0.9 * massive["baseline"] for s in (0, 1, 2))


def test_no_super_experts_generate_no_conditions():
    """A random model has no super expert: the generators that need one add nothing, with one warning."""
    spec = dict(SMALL, conditions=SMALL["conditions"] + [{"generate": "all_super_experts"}])
    with pytest.warns(UserWarning, match=r"no super experts \(largest expert maximum is .*x the median\)"):
        conds = Study(spec).resolve(load("zoo:qwen3-moe"))
    assert [c.name for c in conds] == ["baseline", "drop L1 E3"]
    spec = dict(SMALL, conditions=[{"generate": "random_experts", "k": 2, "layers": [1]}])
    with pytest.warns(UserWarning, match="no super experts"):
        conds = Study(spec).resolve(load("zoo:qwen3-moe"))
    assert [len(c.interventions) for c in conds] == [0, 2, 2]  # its own layers and k: still generated


def test_trained_model_depends_on_its_super_expert_more_than_on_random_experts(tmp_path):
    """zoo:tiny-moe-se (trained, planted: L1.E5 writes channel 17 on position 0): the worked example's study."""
    from workbench.experts.profile import ProfileOptions, profile

    lm = load("zoo:tiny-moe-se")
    study = Study.from_file(Path(__file__).resolve().parents[1] / "examples" / "tiny_moe_super_expert.yaml")
    p = profile(lm, study.texts(), ProfileOptions(sinks=False), progress=False)
    assert [(e["layer"], e["expert"], e["channel"], e["position"]) for e in p["super_experts"]] == [(1, 5, 17, 0)]
    df = study.run(lm, tmp_path, progress=False)
    m = df[df.metric != "generations"].pivot_table(index="condition", columns="metric", values="mean")
    base, sup = m.loc["baseline"], m.loc["super L1.R5"]
    rand = m.loc[[f"random x1 seed {s}" for s in range(5)]]
    assert sup["perplexity"] > 3 * base["perplexity"]  # 4.4 -> 21.9 when measured
    # The five controls are five experts (three were, when seeds could repeat a draw; this asserted a 5x larger rise
    # in perplexity, which one of the other two, expert 2: 4.4 -> 8.6, does not meet). Each 95 % interval of the
    # super expert lies above every control's: perplexity [17.4, 26.5] against at most 12.3, KL [1.83, 2.09] against
    # at most 0.25.
    ci = df[df.metric != "generations"].set_index(["condition", "metric"])
    controls = [f"random x1 seed {s}" for s in range(5)]
    resolved = yaml.safe_load((tmp_path / "study.resolved.yaml").read_text())["conditions"]
    assert len({c["interventions"][0]["expert"] for c in resolved if c.get("group") == "random_experts"}) == 5
    for metric in ("perplexity", "kl"):
        assert ci.loc[("super L1.R5", metric), "ci_low"] > max(ci.loc[(c, metric), "ci_high"] for c in controls)
    assert sup["sink"] < base["sink"] / 4 and (rand["sink"] > 0.9 * base["sink"]).all()  # 0.56 -> 0.07
    assert sup["massive"] < base["massive"] / 4 and (rand["massive"] > 0.9 * base["massive"]).all()
    gens = df[(df.metric == "generations") & (df.condition == "baseline")].text.tolist()
    assert "The capital of France is ->  Paris." in gens


BAD = [
    ("metrics: [perplexity, bogus]\nconditions: []\n", "unknown metric 'bogus'"),
    ("conditions:\n  - name: a\n    interventions:\n      - {op: zero, layers: 1}\n", "line 4: conditions[0].interventions[0]: op 'zero' needs field 'expert'"),
    ("conditions:\n  - name: a\n    interventions: [{op: zero, layers: 1, expert: 99}]\n", "expert 99 out of range"),
    ("conditions:\n  - name: a\n    interventions: [{op: zero, layers: [1\n", "line 4: not valid YAML"),
    ("conditions:\n  - generate: every_expert\n", "line 2: conditions[0]: field 'generate'"),
    ("colour: red\nconditions: []\n", "unknown field 'colour'"),
    ("num_texts: 0\nconditions: []\n", "line 1: field 'num_texts' must be an integer >= 1, got 0"),
    ("conditions: []\nseeds: 3\n", "line 2: field 'seeds' must be a list of integers"),
    ("seeds: []\nconditions:\n  - generate: random_experts\n", "line 3: conditions[0]: random_experts draws one "
                                                                "condition per seed, and field 'seeds' is empty"),
    ("batch_size: -2\nconditions: []\n", "field 'batch_size' must be an integer >= 1, got -2"),
    ("max_new_tokens: -1\nconditions: []\n", "field 'max_new_tokens' must be an integer >= 1, got -1"),
    ("conditions:\n  - name: a\n    interventions: [{op: scale, layers: 1, expert: 1}]\n",
     "line 3: conditions[0].interventions[0]: op 'scale' needs field 'factor'"),
    ("conditions:\n  - name: a\n    interventions: [{op: scale, layers: 1, expert: 1, factor: .nan}]\n",
     "field 'factor' must be a finite number, got nan"),
]


@pytest.mark.parametrize("text,msg", BAD)
def test_malformed_study_fails_before_model_work(tmp_path, text, msg):
    f = tmp_path / "study.yaml"
    f.write_text(text)
    r = subprocess.run([sys.executable, "-m", "workbench", "ablate", "zoo:qwen3-moe", "--study", str(f), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_study_name_left_empty_is_the_default_and_a_list_is_refused(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name:\nconditions: []\n")  # YAML reads the empty value as None
    assert Study.from_file(f).name == "study"
    f.write_text("name: [a, b]\nconditions: []\n")
    with pytest.raises(WorkbenchError, match=r"s.yaml line 1: field 'name' must be a non-empty name, got \['a', 'b'\]"):
        Study.from_file(f)
    assert Study({"name": 7, "conditions": []}).name == "7"


def test_study_rejects_duplicate_and_baseline_names():
    with pytest.raises(WorkbenchError, match="used twice"):
        Study({"conditions": [{"name": "baseline"}]})


def test_welch_matches_scipy_and_handles_constant_groups():
    """Welch's t-test as scipy computes it (float64, to 1e-9), and no warning or NaN when a group is constant
    (an expert routed on every token of every prompt, common at large top-k)."""
    import math
    import warnings

    import torch
    from scipy import stats

    from workbench.experts.contrast import _welch

    g = torch.Generator().manual_seed(0)
    for n, m in ((38, 38), (12, 30), (5, 3)):
        a, b = torch.rand(n, generator=g), torch.rand(m, generator=g) * 0.5 + 0.2
        t, p = stats.ttest_ind(a.double().numpy(), b.double().numpy(), equal_var=False)
        assert _welch(a, b) == pytest.approx((float(t), float(p)), rel=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t, p = _welch(torch.full((38,), 0.9), torch.rand(38, generator=g))  # 0.9 is inexact in float32
        assert math.isfinite(t) and t > 0 and 0.0 < p < 1e-6
        assert _welch(torch.full((9,), 0.9), torch.full((7,), 0.9)) == (0.0, 1.0)
        assert _welch(torch.full((9,), 0.4), torch.full((7,), 0.9)) == (-math.inf, 0.0)


def test_contrast_q_values_are_benjamini_hochberg_over_the_experts_tested():
    """p-values of many experts were given bare: with 64 experts x 16 layers, p < 0.05 is expected of ~50 experts
    that route alike on both sides. q is each p adjusted for the tests made (Benjamini-Hochberg), by hand here."""
    import math

    from workbench.experts.contrast import q_values

    p = [0.01, 0.04, math.nan, 0.03, 0.2, 0.0005]
    finite = sorted((v, i) for i, v in enumerate(p) if v == v)
    m, want, running = len(finite), [math.nan] * len(p), 1.0
    for rank_, (v, i) in reversed(list(enumerate(finite, start=1))):  # q_(r) = min over r' >= r of p_(r') m / r'
        running = min(running, v * m / rank_)
        want[i] = running
    got = q_values(p)
    assert math.isnan(got[2]) and all(abs(g - w) < 1e-12 for g, w in zip(got, want) if w == w)
    assert list(got[[0, 1, 3, 4, 5]]) == pytest.approx([0.025, 0.05, 0.05, 0.2, 0.0025])
    assert math.isnan(q_values([math.nan])[0]) and len(q_values([])) == 0


def test_contrast_finds_a_planted_behaviour_expert(tmp_path, short_gpt2):
    """The same prompts, with expert 6 of layer 1 forced on ' zebra' tokens in the positive run only:
    the ranking must put (1, 6) first, significantly."""
    from workbench.experts.contrast import contrast, rank, routing_by_prompt, top_interventions
    from workbench.interventions import apply

    lm = load("zoo:olmoe")
    positive = [f"The zebra number {i} runs across the plain near zebra {i + 1}." for i in range(12)]
    negative = [f"The horse number {i} runs across the plain near horse {i + 1}." for i in range(12)]
    with apply(lm, [dict(op="force", layers=1, expert=6, weight=0.5, token="zebra")]):
        forced = routing_by_prompt(lm, positive, progress=False)
    df = rank(forced, routing_by_prompt(lm, positive, progress=False))
    top = df.iloc[0]
    assert (top.layer, top.expert) == (1, 6) and top.freq_diff > 0.05 and top.p_value < 1e-4
    assert top.q_value < 1e-3 and (df.q_value >= df.p_value).all()  # still a discovery after the adjustment
    assert top.freq_diff > 5 * df.freq_diff.iloc[1]  # later layers shift a little, far less
    ivs = top_interventions(df, 3)
    assert ivs[0].op == "drop" and ivs[0].layers == (1,) and ivs[0].expert == 6
    # more than there are: every expert, said; drop keeps one expert per layer (dropping all is refused), said
    with pytest.warns(UserWarning) as said:
        every = top_interventions(df, 1000)
    assert len(every) == len(df) - 4 and {(iv.layers[0]) for iv in every} == {0, 1, 2, 3}  # 4 MoE layers
    assert "--top 1000: the model has 32 routed experts" in str(said[0].message)
    assert "drop leaves a layer one expert to route to: " in str(said[1].message)
    assert len(top_interventions(df, 1000, "zero")) == len(df)
    Study({"conditions": [{"name": "c", "interventions": [iv.to_dict() for iv in every]}]}).resolve(lm)  # it runs
    # the CLI writes the table and a study that `workbench ablate` accepts
    (tmp_path / "p.txt").write_text("\n".join(positive))
    (tmp_path / "n.txt").write_text("\n".join(negative))
    r = subprocess.run([sys.executable, "-m", "workbench", "contrast", "zoo:olmoe", "--positive", str(tmp_path / "p.txt"),
                        "--negative", str(tmp_path / "n.txt"), "--top", "2", "--quiet", "--out", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    study = Study.from_file(tmp_path / "c" / "interventions.yaml")
    assert len(study.explicit) == 1 and len(study.explicit[0].interventions) == 2
    # what it was computed from, dtype included (no contrast output said)
    assert (tmp_path / "c" / "interventions.yaml").read_text().startswith("# workbench contrast of zoo:olmoe "
                                                                          "(float32 on cpu): ")
    dense = subprocess.run([sys.executable, "-m", "workbench", "contrast", str(short_gpt2), "--positive",
                            str(tmp_path / "p.txt"), "--negative", str(tmp_path / "n.txt"), "--out", str(tmp_path / "d")],
                           capture_output=True, text=True, timeout=300)
    assert dense.returncode == 2 and "is a dense model: contrast ranks routed experts" in dense.stderr, dense.stderr
    assert not (tmp_path / "d").exists()
    with pytest.raises(WorkbenchError, match="is a dense model: contrast ranks routed experts"):  # it said "no capture
        contrast(load(str(short_gpt2)), positive, negative, progress=False)  # sites selected" from the API


def test_text_metrics_in_length_batches_equal_each_text_alone(planted):
    """Texts run in batches of similar length, not in the given order; every value still lands on its own text
    and equals the text run alone (to float32 error: the batch changes the matmuls' blocking), and prompt-scoped
    interventions see each text's own index."""
    import torch

    from workbench.experts.sinks import eager_attention
    from workbench.interventions import apply

    texts = ["The capital of France is Paris, and the capital of Italy is Rome.", "Hello.",
             "One two three four five six seven eight nine ten eleven twelve.", "A cat sat.",
             "Water boils at one hundred degrees.", "Yes",
             "The quick brown fox jumps over the lazy dog again and again.", "Seven is a number."]
    want = {"perplexity", "sink", "massive", "kl"}
    with eager_attention(planted.model):
        base, base_lp = M.text_metrics(planted, texts, want, None, batch_size=3)
        alone = [M.text_metrics(planted, [t], want, None, batch_size=1) for t in texts]
        for k in ("perplexity", "sink", "massive"):
            assert base[k] == pytest.approx([a[0][k][0] for a in alone], rel=1e-4, abs=1e-6, nan_ok=True)
        for lp, (_, a_lp) in zip(base_lp, alone):
            assert lp.shape == a_lp[0].shape and torch.allclose(lp, a_lp[0], atol=1e-4)
        iv = [dict(op="zero_channel", layers=0, channel=17, prompts=[4])]  # the planted channel, text 4 only
        with apply(planted, iv) as applied:
            cond, _ = M.text_metrics(planted, texts, want, base_lp, batch_size=3, applied=applied)
    changed = [i for i, v in enumerate(cond["kl"]) if v > 1e-6]
    assert changed == [4]
    others = [i for i in range(len(texts)) if i != 4]
    assert [cond["perplexity"][i] for i in others] == pytest.approx([base["perplexity"][i] for i in others], rel=1e-5,
                                                                     nan_ok=True)
    with pytest.raises(WorkbenchError, match="text 1 .* tokenizes to nothing"):
        M.text_metrics(planted, ["Hello.", ""], {"perplexity"})
    # the baseline of a study without kl kept every text's log-probs all the same (texts x tokens x vocab floats)
    assert M.text_metrics(planted, texts, {"perplexity"}, None, batch_size=3)[1] == []


@pytest.mark.parametrize("spec", ["zoo:qwen3-moe", "zoo:deepseek-v3"])
def test_batched_generations_equal_each_prompt_alone(spec):
    """Prompts of different lengths generated together, padded on the left, continue as each does alone, with a
    position-scoped intervention too (positions count real tokens). Each greedy step of the runs alone has a clear
    winner (top-2 logit gap checked), so equal text is what batching must give."""
    import torch

    from workbench.interventions import apply

    lm = load(spec)
    prompts = ["The capital of France is", "Once upon a time, in a land far away, there lived a", "Hi",
               "Seven plus five equals", "A list of colours: red, green, blue, yellow, purple, orange, and"]

    def alone():
        out = []
        for p in prompts:
            ids = lm.tokenizer(p, return_tensors="pt").input_ids
            g = lm.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                                  output_scores=True, return_dict_in_generate=True)
            for s in g.scores:
                top = s[0].float().topk(2).values
                assert float(top[0] - top[1]) > 1e-4  # no near-tie: equal text is a meaningful check
            out.append(lm.tokenizer.decode(g.sequences[0, ids.shape[1]:], skip_special_tokens=True))
        return out

    with torch.no_grad():
        for ivs in ([], [dict(op="zero_channel", layers=1, channel=5, factor=0.0, positions=[0, -1])]):
            with apply(lm, ivs):
                assert M.generations(lm, prompts, 8, batch_size=3) == alone()
    with pytest.raises(WorkbenchError, match="generation prompt 1 .* tokenizes to nothing"):
        M.generations(lm, ["Hi", ""])
