"""A very small SAE training run with SAELens' trainer on a zoo model: it learns, saves and loads back."""

import contextlib
import json
import re

import pytest
import torch

pytest.importorskip("sae_lens")

from workbench.data import default_prompts  # noqa: E402
from workbench.sae import evaluate, load_sae, resolve_site  # noqa: E402
from workbench.sae.stream import Tokens  # noqa: E402
from workbench.sae.train import ActivationStream, TrainOptions  # noqa: E402
from workbench.tracing.sites import Site  # noqa: E402


def test_small_training_run_learns_and_round_trips(tmp_path, capsys):
    from workbench.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(default_prompts()[:40]) + "\n")  # ~400 tokens
    out = tmp_path / "sae"
    rc = main(["sae", "train", "zoo:tiny-moe", "--site", "L2.resid_post", "--prompts", str(prompts),
               "--tokens", "12800", "--batch-size", "256", "--k", "8", "--expansion", "4", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "explained variance" in printed and "L0 8.00" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["mse_last"] < 0.5 * m["mse_first"]  # first / last 5 % of the steps
    assert m["explained_variance"] > 0.2 and m["train_explained_variance"] > m["explained_variance"] - 0.2
    assert m["l0"] == pytest.approx(8.0) and m["steps"] == 50 and m["heldout_prompts"] == 4
    assert m["model_dtype"] == "float32"  # the activations' dtype (the SAE's own is cfg.json's)
    # SAELens' own format, loaded back through SAELens: same numbers, same site
    sae = load_sae(out)
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.d_sae == 256
    from workbench.models.specs import load

    lm = load("zoo:tiny-moe")
    assert resolve_site(lm, sae) == Site(2, "resid_post")
    tokens = Tokens.of(lm, default_prompts()[:40], 128)
    stream = ActivationStream(lm, Site(2, "resid_post"), tokens, [i for i in range(40) if i % 10 == 9],
                              TrainOptions(batch_size=256))
    again = evaluate(sae, torch.cat(list(stream.one_pass())))
    assert again["explained_variance"] == pytest.approx(m["explained_variance"], abs=1e-4)


def test_quiet_training_shows_no_bar_and_trains_the_same_sae(tmp_path, capfd):
    """`sae train` had no --quiet: SAELens' training bar and norm-estimate bar always ran, and the training bar
    opened before the estimate, so its clock ran through the estimate (its first ETA counted the model's forwards
    as training). The estimate now runs first, from the same stream, so the SAE is the one SAELens' own order gives."""
    from safetensors.torch import load_file

    from workbench.cli import main
    from workbench.sae import train as train_mod

    argv = ["sae", "train", "zoo:tiny-moe", "--site", "L1.resid_post", "--tokens", "2048", "--batch-size", "256",
            "--k", "8"]
    assert main(argv + ["--quiet", "--out", str(tmp_path / "q")]) == 0
    err = capfd.readouterr().err
    assert "Training SAE" not in err and "Estimating norm" not in err, err
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    err = capfd.readouterr().err
    assert "Training SAE" in err and "Estimating norm" in err
    # the bar's first update is a training step: the estimate ran before the bar opened
    assert err.index("Estimating norm") < err.index("Training SAE")
    # SAELens' order (its fit estimating under its bar) trains the same SAE: same stream, same draws
    real = train_mod._bars

    @contextlib.contextmanager
    def theirs(show):
        from sae_lens.training.activation_scaler import ActivationScaler

        keep = ActivationScaler.estimate_scaling_factor
        calls = []

        def only_in_fit(self, *a, **k):  # the first call is ours: skipped, so fit makes its own
            calls.append(1)
            if len(calls) > 1:
                return keep(self, *a, **k)
        ActivationScaler.estimate_scaling_factor = only_in_fit
        try:
            with real(show):
                yield
        finally:
            ActivationScaler.estimate_scaling_factor = keep
    train_mod._bars = theirs
    try:
        assert main(argv + ["--quiet", "--out", str(tmp_path / "s")]) == 0
    finally:
        train_mod._bars = real
    ours, saelens = (load_file(tmp_path / d / "sae_weights.safetensors") for d in ("q", "s"))
    assert ours.keys() == saelens.keys() and all(torch.equal(ours[k], saelens[k]) for k in ours)


def test_a_run_shorter_than_one_pass_evaluates_and_counts_passes(tmp_path, capsys):
    """Training that stops part-way through the first pass (a corpus larger than --tokens) leaves its forward
    suspended; the held-out evaluation after it must run (it met the suspended pass's hooks: 'captured 592 rows
    but the batch has 384 tokens'). Passes are counted from the rows the trainer drew; a held-out share that
    leaves nothing to train on is refused before anything is written."""
    from workbench.cli import main

    common = ["sae", "train", "zoo:tiny-moe", "--site", "L1.resid_post", "--batch-size", "256", "--k", "8"]
    assert main(common + ["--tokens", "512", "--out", str(tmp_path / "a")]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["passes"] is None and m["corpus_tokens"] is None and m["eval_split"] == "held-out prompts"
    assert m["train_explained_variance"] == m["train_explained_variance"]  # measured on the rows streamed (not NaN)
    assert "less than one pass" in capsys.readouterr().out
    texts = ["--text", "The capital of France is Paris.", "--text", "Water boils at one hundred degrees."]
    assert main(common + texts + ["--tokens", "1024", "--holdout-every", "0", "--out", str(tmp_path / "b")]) == 0
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    drawn = m["tokens_trained"] + min(20, m["steps"]) * 256  # SAELens' norm estimate draws its batches first
    assert m["passes"] == pytest.approx(drawn / m["corpus_tokens"], rel=1e-3) and m["corpus_tokens"] == 12
    assert main(common + ["--holdout-every", "1", "--out", str(tmp_path / "c")]) == 2
    assert "--holdout-every 1 holds out every prompt" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_an_expert_the_held_out_prompts_never_reach(tmp_path, capsys):
    """Training at an expert site whose held-out prompts route it no token crashed after training (torch.cat of no
    rows, an internal error); an expert no training prompt reaches was blamed on prompts being too short."""
    from workbench.cli import main

    argv = ["sae", "train", "zoo:tiny-moe", "--tokens", "200", "--batch-size", "32", "--holdout-every", "2",
            "--text", "The cat sat on the mat.", "--text", "Hi there"]
    with pytest.warns(UserWarning, match="no held-out token reaches L2.expert.E1"):
        assert main([*argv, "--site", "L2.expert.E1", "--out", str(tmp_path / "e1")]) == 0
    assert "of training prompts" in capsys.readouterr().out
    assert json.loads((tmp_path / "e1" / "metrics.json").read_text())["eval_split"] == "training prompts"
    assert main([*argv, "--site", "L2.expert.E5", "--out", str(tmp_path / "e5")]) == 2
    assert "no token of them is routed to this expert" in capsys.readouterr().err


def test_a_diverged_run_writes_nothing_and_k_past_d_sae_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """`--lr 1e6` saved an SAE of weights near 8e12 and printed "explained variance -inf" with exit 0; `--k 300
    --d-sae 256` was refused only after the model had loaded and the prompts were tokenised."""
    from workbench.cli import main
    from workbench.models import specs

    from helpers import one_error

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(default_prompts()[:12]) + "\n")
    out = tmp_path / "sae"
    code = main(["sae", "train", "zoo:tiny-moe", "--site", "L1.resid_post", "--prompts", str(prompts), "--tokens",
                 "1024", "--batch-size", "256", "--max-tokens", "16", "--lr", "1e6", "--out", str(out)])
    msg = one_error(code, capsys.readouterr().err, "training diverged")
    assert "nothing written: a lower --lr (now 1e+06)" in msg and not out.exists()

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(specs, "load", no_load)
    code = main(["sae", "train", "zoo:tiny-moe", "--site", "L1.resid_post", "--prompts", str(prompts), "--k", "300",
                 "--d-sae", "256", "--out", str(out)])
    assert one_error(code, capsys.readouterr().err, "--k 300 is larger than the SAE (256 features)")


def test_options_of_the_wrong_kind_are_refused_before_training(tmp_path):
    """A notebook's k=2.5 failed inside SAELens mid-training, lr=-1 inside torch's Adam, holdout_every=-1 held nothing
    out (the fit measured on training rows, unsaid), and an out_dir that is a file failed after training."""
    from workbench.errors import WorkbenchError
    from workbench.models.specs import load
    from workbench.sae.train import train_sae

    lm = load("zoo:tiny-moe")
    prompts = default_prompts()[:8]
    cases = [(dict(k=2.5), "k must be an integer, got 2.5"), (dict(lr=-1.0), "lr must be a number > 0, got -1.0"),
             (dict(tokens="2000"), "tokens must be an integer, got '2000'"),
             (dict(holdout_every=-1), "holdout_every must be >= 0, got -1"),
             (dict(skip_first="no"), "skip_first must be True or False, got 'no'"),
             (dict(seed=-3), "seed must be an integer in [0, ")]
    for kw, msg in cases:
        with pytest.raises(WorkbenchError, match=f"^{re.escape(msg)}"):
            train_sae(lm, "L1.resid_post", prompts, TrainOptions(**kw))
    with pytest.raises(WorkbenchError, match=r"^opts must be a TrainOptions, not dict: TrainOptions\(\*\*opts\)"):
        train_sae(lm, "L1.resid_post", prompts, {"tokens": 2000})
    (tmp_path / "afile").write_text("x")
    with pytest.raises(WorkbenchError, match="is a file, not a folder"):
        train_sae(lm, "L1.resid_post", prompts, TrainOptions(tokens=512, batch_size=256), out_dir=tmp_path / "afile")
