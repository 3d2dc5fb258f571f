"""A very small SAE training run with SAELens' trainer on a zoo model: it learns, saves and loads back."""

import json

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
