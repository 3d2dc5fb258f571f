"""Prompts of similar length share a batch (``trace(by_length=True)``, the default): less padding, the same
results. Global token indices follow prompt order whatever the batches, so every statistic and every location
is the one the prompt order gives; only the order of float sums differs."""

import numpy as np
import pytest
import torch

from helpers import assert_json_close
from workbench.models.specs import load
from workbench.tracing.reducers import Payload
from workbench.tracing.runner import batch_members, trace
from workbench.tracing.sites import all_sites

# Lengths from 1 to ~20 tokens, each prompt with its own first word: no two prompts share a prefix, so no two
# tokens compute the same values and every maximum has one place (prompts that share a prefix tie exactly,
# and rounding at another batch shape may break such a tie either way).
PROMPTS = [
    "Paris",
    "Seven plus five equals twelve, and twelve minus five equals seven again.",
    "Water boils at one hundred degrees.",
    "def add(a, b): return a + b",
    "Quietly the old cat slept by the warm fire while snow fell outside the small wooden house.",
    "Bonjour",
    "Mount Everest is the highest mountain on Earth.",
    "Light travels fast.",
    "In 1969 the first humans walked on the Moon, and millions watched on television around the world.",
    "Blue",
    "Gold is a metal that does not rust.",
    "Every morning she ran along the river before work.",
    "Tokyo is the capital of Japan.",
]


def plain(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


@pytest.mark.parametrize("n, size, window", [(0, 4, 2), (1, 4, 2), (37, 4, 3), (37, 5, 64), (64, 8, 2)])
def test_batch_members_cover_every_prompt_once_with_similar_lengths_together(n, size, window):
    lengths = torch.randint(1, 50, (n,), generator=torch.Generator().manual_seed(n + size))
    got = [m.tolist() for m in batch_members(lengths, size, True, window=window)]
    assert len(got) == -(-n // size)
    assert sorted(i for m in got for i in m) == list(range(n))  # every prompt once
    assert all(m == sorted(m) for m in got)  # each batch's prompts in prompt order (its rows: increasing tokens)
    span = size * window
    for w in range(0, len(got), window):  # a window's prompts are its own; inside it, shorter batches first
        win = got[w:w + window]
        assert {i for m in win for i in m} == set(range(w * size, min(w * size + span, n)))
        for a, b in zip(win, win[1:]):
            assert max(lengths[a]) <= min(lengths[b])
    padded = lambda batches: sum(len(m) * int(max(lengths[m])) for m in batches if m)  # noqa: E731
    assert padded(got) <= padded(plain(n, size))
    assert [m.tolist() for m in batch_members(lengths, size, False, window=window)] == plain(n, size)
    same = torch.full((n,), 7)  # one length: the sort is stable, so the batches are the plain ones
    assert [m.tolist() for m in batch_members(same, size, True, window=window)] == plain(n, size)


@pytest.fixture(scope="module", params=["zoo:qwen2-moe", "zoo:deepseek-v3"])
def lm64(request):
    """A zoo MoE in float64: another batch shape changes values by ~1e-8 (eager attention's softmax stays float32)
    instead of ~1e-3 of fp32 outputs, so no routing choice or maximum's place can flip on a near-tie."""
    lm = load(request.param)
    lm.model.double()
    lm.model.set_experts_implementation("batched_mm")  # grouped_mm takes no float64; batched_mm's outputs are read too
    return lm


def test_length_batches_give_the_profile_of_the_prompt_order(lm64):
    """The whole profile (super experts, router statistics, massive activations, sinks, Q/K/V norms) over
    batches of similar length equals the one over batches in prompt order: counts, locations and maxima
    exactly, float values to 1e-6, with less padding computed."""
    from workbench.experts.profile import ProfileOptions, profile

    by_length = profile(lm64, PROMPTS, ProfileOptions(batch_size=3), progress=False)
    given = profile(lm64, PROMPTS, ProfileOptions(batch_size=3, by_length=False), progress=False)
    lengths = [len(lm64.tokenizer(p).input_ids) for p in PROMPTS]
    assert given["run"]["positions"] == sum(len(c) * max(c) for c in (lengths[s:s + 3] for s in range(0, 13, 3)))
    assert by_length["run"]["positions"] < 0.75 * given["run"]["positions"]
    assert (by_length["meta"].pop("batch_order"), given["meta"].pop("batch_order")) == ("length", "given")
    for p in (by_length, given):
        p.pop("run"), p["meta"].pop("seconds")
    assert_json_close(by_length, given, rtol=1e-6, atol=1e-9)
    assert [(e["layer"], e["expert"], e["kind"]) for e in by_length["super_experts"]] == \
        [(e["layer"], e["expert"], e["kind"]) for e in given["super_experts"]]
    where = lambda p: [(e["prompt_index"], e["position"]) for e in p["experts"]]  # noqa: E731
    assert where(by_length) == where(given)  # no near-tie at 1e-8: every maximum in its place


class KeepOrder:
    """A coalescing sink that records, per payload, what it claims about its order and what is true."""

    coalesce = True

    def __init__(self):
        self.seen: list[tuple[bool | None, bool, bool]] = []

    def update(self, p: Payload) -> None:
        t = p.tokens
        true = t.numel() < 2 or bool((t[1:] > t[:-1]).all())
        claimed = p.ordered
        self.seen.append((claimed, p.increasing(), true))


@pytest.mark.parametrize("by_length", [True, False])
def test_coalesced_payloads_never_claim_an_order_they_do_not_have(by_length):
    """Reducers take a shortcut on payloads whose tokens increase (the first maximal row is the smallest token);
    a coalesced payload of length batches, which come out of prompt order, must not claim it."""
    lm = load("zoo:olmoe")
    sites = all_sites(lm.adapter, lm.model, ["resid_post", "router"])
    keep = {s: [KeepOrder()] for s in sites}
    trace(lm, PROMPTS * 2, sites, reducers=(), batch_size=2, progress=False, sinks=keep, by_length=by_length)
    seen = [x for ks in keep.values() for k in ks for x in k.seen]
    assert seen and all(inc == true and (claimed is not True or true) for claimed, inc, true in seen)
    if by_length:
        assert not all(true for *_, true in seen)  # the case this test is about happened
    else:
        assert all(claimed is True for claimed, *_ in seen)  # in prompt order nothing needs checking


def test_choice_recorder_writes_each_run_of_tokens_where_it_belongs(tmp_path):
    """The routing recorder writes a payload's rows at their tokens' places, one write per run of consecutive
    tokens (length batches hand it several prompts that are not neighbours)."""
    from workbench.experts.routing import ChoiceRecorder

    k, n = 2, 12
    tokens = torch.tensor([5, 6, 7, 0, 1, 10])
    topk = torch.tensor([[1, 0], [2, 3], [4, 1], [0, 2], [3, 1], [2, 0]])
    logits = torch.zeros(6, 5).scatter_(1, topk, torch.tensor([[2.0, 1.0]]).expand(6, 2))  # slot 0 scores highest
    rec = ChoiceRecorder(tmp_path / "c.i16", k)
    rec.update(Payload(logits, tokens, topk))
    rec.update(Payload(logits[:1], torch.tensor([11]), topk[:1]))
    rec.close()
    got = np.fromfile(tmp_path / "c.i16", dtype=np.int16)
    want = np.zeros((n, k), dtype=np.int16)
    want[tokens.numpy()] = topk.numpy()
    want[11] = topk[0].numpy()
    assert got.size == n * k and (got.reshape(n, k) == want).all()


def test_a_checkpoint_of_other_batches_is_not_resumed(tmp_path):
    """Length batches hold other prompts than the prompt order's batches of the same size: a checkpoint taken
    with one is a different run for the other (ignored with a warning), while prompts of one length, which
    batch alike either way, resume."""
    from workbench.tracing.state import Checkpoint

    lm = load("zoo:olmoe")
    sites = all_sites(lm.adapter, lm.model, ["router"])

    class Stop(Exception):
        pass

    def interrupted(prompts, by_length, ck):
        real = Checkpoint.save

        def save_then_stop(self, cursor, fp, flat):
            real(self, cursor, fp, flat)
            raise Stop

        Checkpoint.save = save_then_stop
        try:
            with pytest.raises(Stop):
                trace(lm, prompts, sites, ("expert_counts",), batch_size=2, progress=False, checkpoint=ck,
                      by_length=by_length)
        finally:
            Checkpoint.save = real

    ck = Checkpoint(tmp_path / "a.safetensors", every=1)
    interrupted(PROMPTS, False, ck)
    with pytest.warns(UserWarning, match="different run"):
        res = trace(lm, PROMPTS, sites, ("expert_counts",), batch_size=2, progress=False, checkpoint=ck)
    assert res.meta["resumed_at_batch"] is None
    same = [f"Item number {i} is here." for i in range(6)]  # one length: the same batches either way
    assert len({len(lm.tokenizer(p).input_ids) for p in same}) == 1
    ck = Checkpoint(tmp_path / "b.safetensors", every=1)
    interrupted(same, False, ck)
    res = trace(lm, same, sites, ("expert_counts",), batch_size=2, progress=False, checkpoint=ck)
    assert res.meta["resumed_at_batch"] == 1


def test_the_recorded_batch_order_is_the_rule_applied(tmp_path):
    """``batch_order`` names the rule the run used, also where length batching leaves the prompts in their order
    (one batch); a dump always batches in the given order and says so."""
    lm = load("zoo:olmoe")
    sites = all_sites(lm.adapter, lm.model, ["router"])
    run = lambda **kw: trace(lm, PROMPTS[:2], sites, ["absmax"], batch_size=8, progress=False, **kw).meta  # noqa: E731
    assert run()["batch_order"] == "length"
    assert run(by_length=False)["batch_order"] == "given"
    assert run(dump_dir=tmp_path / "d")["batch_order"] == "given"
