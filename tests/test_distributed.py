"""Data-parallel profiling: two CPU ranks over gloo (torchrun) give the single-process result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import assert_json_close
from workbench.data import DATA_DIR
from workbench.distributed import Shard

PY = sys.executable
TORCHRUN = Path(PY).with_name("torchrun")


def test_shards_are_contiguous_and_cover_every_batch():
    for n in (0, 1, 5, 12, 13):
        for world in (1, 2, 3, 4):
            blocks = [Shard(r, world).batches(n) for r in range(world)]
            assert [b for blk in blocks for b in blk] == list(range(n))  # in order, no gap, no overlap
            assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def test_shards_balance_the_work_of_length_sorted_batches():
    """Batches sorted by length cost more and more; equal batch counts gave rank 0 of 2 the 156 shortest positions of
    3,686 (a sweep's run). Blocks stay contiguous and cover every batch; each rank's work is within a batch's of
    the mean."""
    costs = [2 * (i + 1) ** 2 for i in range(45)]  # positions per batch, growing
    for world in (2, 3, 4):
        blocks = [Shard(r, world).batches(costs) for r in range(world)]
        assert [b for blk in blocks for b in blk] == list(range(len(costs)))
        work = [sum(costs[b] for b in blk) for blk in blocks]
        assert max(work) - min(work) <= 2 * max(costs), (world, work)
        assert min(work) > sum(costs) / world / 2
    assert [Shard(r, 2).batches([100, 1, 1]) for r in range(2)] == [range(0, 1), range(1, 3)]
    assert [Shard(r, 3).batches([]) for r in range(3)] == [range(0, 0)] * 3


def test_two_rank_merge_equals_one_process():
    """In-process: run each half of the batches as a rank would, merge in rank order, compare with one pass."""
    from workbench.experts.profile import ProfileOptions, profile
    from workbench.experts.report import split
    from workbench.io import dumps_json
    from workbench.models.specs import load

    lm = load("zoo:qwen2-moe")
    prompts = (DATA_DIR / "prompts.txt").read_text().splitlines()[:24]
    opts = ProfileOptions(batch_size=4)
    whole = dumps_json(split(profile(lm, prompts, opts, progress=False))[0])

    gathered = {}

    class FakeShard(Shard):
        def combine(self, objs, info=None):  # rank 1 keeps its state; rank 0 merges it, as Shard.combine does
            from workbench.tracing import state

            if self.rank == 1:
                gathered["flat"], gathered["info"] = state.flatten(objs), info
                return None
            state.merge(objs, gathered["flat"])
            return [info, gathered["info"]]

    alone = profile(lm, prompts, opts, progress=False)
    profile(lm, prompts, opts, progress=False, shard=FakeShard(1, 2))
    merged = profile(lm, prompts, opts, progress=False, shard=FakeShard(0, 2))
    ranks = merged["run"]["ranks"]
    cut = ranks[0]["batches"][1]  # where the positions split in two (contiguous blocks, balanced by positions)
    assert merged["run"]["world_size"] == 2 and merged["run"]["batches"] == [0, cut] and 0 < cut < 6
    # run.json said rank 0's batches and positions only; each rank's are there now, and the positions are the run's
    assert [(r["rank"], r["batches"]) for r in ranks] == [(0, [0, cut]), (1, [cut, 6])]
    assert merged["run"]["positions"] == alone["run"]["positions"] == sum(r["positions"] for r in ranks)
    # Same batches, same kernels; only the float64 sums are merged in another order (rank by rank).
    assert_json_close(json.loads(dumps_json(split(merged)[0])), json.loads(whole))


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_equal_single_process(tmp_path):
    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed next to this Python")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join((DATA_DIR / "prompts.txt").read_text().splitlines()[:40]) + "\n")
    args = ["profile", "zoo:qwen2-moe", "--prompts", str(prompts), "--batch-size", "4", "--checkpoint-every", "2",
            "--no-plots", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([PY, "-m", "workbench", *args, "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "workbench", *args, "--out",
                          str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("profiled zoo:qwen2-moe") == 1  # only rank 0 reports and writes
    a = {p.name: p for p in (tmp_path / "one").iterdir()}
    b = {p.name: p for p in (tmp_path / "two").iterdir()}
    assert set(a) == set(b)  # every rank's checkpoint was removed at the end
    # Each rank runs the single process's batches at the same shapes; the float64 sums are merged in
    # another order, so the results agree to tolerance (in practice to the 8 digits written).
    assert_json_close(json.loads(b["profile.json"].read_text()), json.loads(a["profile.json"].read_text()))
    for name in a:
        if name.endswith(".parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(b[name]), pd.read_parquet(a[name]), rtol=1e-5, atol=1e-6)
    run = json.loads(b["run.json"].read_text())
    cut = run["batches"][1]  # contiguous blocks, balanced by positions
    assert run["world_size"] == 2 and run["batches"] == [0, cut] and 0 < cut < 10
    assert [r["batches"] for r in run["ranks"]] == [[0, cut], [cut, 10]]
    work = [r["positions"] for r in run["ranks"]]
    assert abs(work[0] - work[1]) <= max(work) / 2, work  # length-sorted batches: equal counts are not equal work
    assert run["positions"] == json.loads(a["run.json"].read_text())["positions"]


def test_profile_alone_runs_under_torchrun(monkeypatch, capsys, tmp_path):
    from workbench.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["trace", "zoo:olmoe", "--text", "hi", "--out", str(tmp_path / "o")]) == 2
    assert "error: only `workbench profile` runs under torchrun" in capsys.readouterr().err
    monkeypatch.delenv("RANK", raising=False)
    assert main(["profile", "zoo:olmoe", "--text", "hi", "--out", str(tmp_path / "o")]) == 2
    assert "error: WORLD_SIZE is set but RANK is not" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert torch.distributed.is_available()


def test_checkpoints_of_another_rank_count_go_when_the_outputs_are_written(run, tmp_path):
    """A killed 2-rank run's checkpoints stayed beside the outputs of a single-process rerun (and the other way
    round), and so did a checkpoint when the rerun had checkpoints off."""
    out = tmp_path / "o"
    out.mkdir()
    for name in ("profile.checkpoint.rank0of2.safetensors", "profile.checkpoint.rank1of2.safetensors"):
        (out / name).write_bytes(b"x")
    code, _, err = run("profile", "zoo:olmoe", "--text", "hello there", "--no-plots", "--quiet", "--out", out)
    assert code == 0, err
    assert "removed 2 checkpoint file(s) of an earlier run (profile.checkpoint.rank0of2.safetensors, " in err
    assert not list(out.glob("profile.checkpoint*"))
    (out / "profile.checkpoint.safetensors").write_bytes(b"x")
    code, _, err = run("profile", "zoo:olmoe", "--text", "hello there", "--no-plots", "--quiet", "--checkpoint-every",
                       "0", "--out", out)
    assert code == 0 and not list(out.glob("profile.checkpoint*")), err
