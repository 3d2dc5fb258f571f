"""Full dumps: opt-in, sharded, and equal to what the reducers saw."""

import json

import torch

from helpers import PROMPTS
from workbench.models.specs import load
from workbench.tracing.dump import read_site
from workbench.tracing.reducers import AbsMax, Payload
from workbench.tracing.runner import trace
from workbench.tracing.sites import Component, Site, all_sites


def test_dump_round_trip_equals_reducers(tmp_path):
    lm = load("zoo:qwen2-moe")
    sites = all_sites(lm.adapter, lm.model, ["expert", "shared_expert", "resid_post"], [1])
    prompts = PROMPTS * 4
    r = trace(lm, prompts, sites, ["absmax"], batch_size=3, dump_dir=tmp_path / "d", dump_shard_rows=16,
              progress=False)
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert index["num_tokens"] == r.num_tokens
    resid = Site(1, Component.RESID_POST)
    assert len(index["sites"][resid.key]) > 1  # streamed in several shards
    for site in sites:
        again = AbsMax()
        rows = 0
        for values, tokens in read_site(tmp_path / "d", site):
            again.update(Payload(values, tokens))
            rows += values.shape[0]
        assert rows == int(r[site]["absmax"].rows)
        if rows:
            assert again.result() == r[site]["absmax"].result()
    # The residual dump holds every real token exactly once, padding excluded.
    toks = torch.cat([t for _, t in read_site(tmp_path / "d", resid)])
    assert sorted(toks.tolist()) == list(range(r.num_tokens))


def test_a_killed_dumps_temporaries_are_cleared_by_the_next_dump(tmp_path):
    """A dump killed mid-write leaves save_safetensors' private folder (holding safetensors' own .tmpXXXXXX);
    the next dump into the same folder removes it."""
    lm = load("zoo:qwen2-moe")
    sites = all_sites(lm.adapter, lm.model, ["resid_post"], [1])
    left = [tmp_path / "d" / ".tokens.safetensors.k1ll3d.tmp",
            tmp_path / "d" / "L1.resid_post" / ".shard-00000.safetensors.x.tmp"]
    for d in left:
        d.mkdir(parents=True)
        (d / ".tmpAbC123").write_bytes(b"half")
    trace(lm, PROMPTS, sites, ["absmax"], dump_dir=tmp_path / "d", progress=False)
    assert not [p for p in (tmp_path / "d").rglob(".*")], sorted(map(str, (tmp_path / "d").rglob(".*")))
    assert sum(v.shape[0] for v, _ in read_site(tmp_path / "d", sites[0])) > 0


def test_no_dump_by_default(tmp_path):
    lm = load("zoo:olmoe")
    r = trace(lm, PROMPTS, all_sites(lm.adapter, lm.model, ["expert"]), progress=False)
    assert r.dump_dir is None
