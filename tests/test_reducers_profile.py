"""The reducers behind the profile pass: TopK, Log2Histogram and ExpertAbsMax, against brute force.

Same approach as test_reducers.py: hypothesis draws values with ties and NaN/inf, tokens in
arbitrary order, and random partitions into parts; each reducer must equal a plain-Python reference
and merge(split) == whole exactly, however the rows are split, streamed or merged.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from test_reducers import NAN, SETTINGS, Case, assert_same_state, cases, orders, ref_absmax
from workbench.tracing.reducers import AbsMax, ExpertAbsMax, Log2Histogram, Payload, Scratch, TopK, scratch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


def feed(make, payloads, order=None):
    """Reduce each payload separately and merge in ``order``; and stream them into one reducer."""
    parts = []
    for p in payloads:
        r = make()
        r.update(p)
        parts.append(r)
    order = list(range(len(parts))) if order is None else order
    merged = parts[order[0]]
    for i in order[1:]:
        merged.merge(parts[i])
    streamed = make()
    for i in order:
        streamed.update(payloads[i])
    return merged, streamed


# ----------------------------------------------------------------------------------------------
# TopK
# ----------------------------------------------------------------------------------------------


def ref_topk(values: torch.Tensor, tokens: torch.Tensor, k: int) -> list[tuple[float, int, int]]:
    entries = []
    for i, row in enumerate(values.to(torch.float64).tolist()):
        for c, v in enumerate(row):
            if not math.isnan(v):
                entries.append((abs(v), int(tokens[i]), c))
    entries.sort(key=lambda e: (-e[0], e[1], e[2]))
    return entries[:k]


def topk_entries(r: TopK) -> list[tuple[float, int, int]]:
    return list(zip(r.values.tolist(), r.tokens.tolist(), r.channels.tolist()))


@SETTINGS
@given(case=cases(), k=st.integers(1, 7), data=st.data())
def test_topk_equals_brute_force_however_the_rows_are_split(case: Case, k, data):
    """Streaming fills the reducer, then later parts take the threshold path: same answer."""
    ref = ref_topk(case.values, case.tokens, k)
    nan = int(torch.isnan(case.values.to(torch.float64)).sum())
    order = data.draw(orders(case.parts), label="order")
    merged, streamed = feed(lambda: TopK(k=k), case.part_payloads(), order)
    for r in (merged, streamed):
        assert topk_entries(r) == ref
        assert int(r.nan_count) == nan
    assert_same_state(merged, streamed)


def test_topk_threshold_path_keeps_ties_with_smaller_tokens():
    r = TopK(k=2)
    r.update(Payload(torch.tensor([[5.0, 1.0], [3.0, 0.0]]), torch.tensor([10, 11])))
    assert topk_entries(r) == [(5.0, 10, 0), (3.0, 11, 0)]
    # Full now; a tie with the smallest kept value but a smaller token must replace it.
    r.update(Payload(torch.tensor([[-3.0, NAN]]), torch.tensor([2])))
    assert topk_entries(r) == [(5.0, 10, 0), (3.0, 2, 0)]
    assert int(r.nan_count) == 1


# ----------------------------------------------------------------------------------------------
# Log2Histogram
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(case=cases(), data=st.data())
def test_log2_histogram_merges_exactly_and_bins_every_value_where_it_belongs(case: Case, data):
    order = data.draw(orders(case.parts), label="order")
    merged, streamed = feed(Log2Histogram, case.part_payloads(), order)
    whole = Log2Histogram()
    whole.update(case.payload())
    assert_same_state(merged, whole)
    assert_same_state(streamed, whole)
    flat = case.values.to(torch.float32).flatten().tolist()
    assert int(whole.nan_count) == sum(math.isnan(v) for v in flat)
    assert int(whole.inf_count) == sum(math.isinf(v) for v in flat)
    assert int(whole.counts.sum()) == sum(math.isfinite(v) for v in flat)
    for code in torch.nonzero(whole.counts).flatten().tolist():
        lo, hi = Log2Histogram.edges(code)
        assert int(whole.counts[code]) == sum(math.isfinite(v) and lo <= abs(v) < hi for v in flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_log2_histogram_median_is_within_a_bin_of_the_exact_median(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4001, 7, generator=g) * torch.logspace(-3, 3, 7)).to(dtype)
    h = Log2Histogram()
    for part in x.split(500):
        h.update(Payload(part, torch.arange(part.shape[0])))
    exact = statistics.median(x.to(torch.float32).abs().flatten().tolist())
    assert abs(h.median() / exact - 1) < 2 ** (1 / 128) - 1  # within one bin width (0.54 %)
    assert h.quantile(1.0) == pytest.approx(float(x.float().abs().max()), rel=0.006)


def test_log2_histogram_special_values():
    h = Log2Histogram()
    bits = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)  # a NaN sharing inf's code
    x = torch.cat([torch.tensor([0.0, -0.0, math.inf, -math.inf, NAN, 1.0]), bits])[None, :]
    h.update(Payload(x, torch.tensor([0])))
    assert (int(h.counts[0]), int(h.inf_count), int(h.nan_count), int(h.counts.sum())) == (2, 2, 2, 3)
    assert h.quantile(0.5) == pytest.approx(1.0, rel=0.006)
    assert h.quantile(1.0) == math.inf
    assert math.isnan(Log2Histogram().median())
    # float64 beyond float32's range rounds to inf, and is counted as inf (it was counted as NaN)
    big = Log2Histogram()
    big.update(Payload(torch.tensor([[1e300, -1e39, 2.0, math.inf]], dtype=torch.float64), torch.tensor([0])))
    assert (int(big.inf_count), int(big.nan_count), int(big.counts.sum())) == (3, 0, 1)


# ----------------------------------------------------------------------------------------------
# ExpertAbsMax
# ----------------------------------------------------------------------------------------------


@st.composite
def expert_cases(draw, dtype=torch.float32):
    case = draw(cases(dtype=dtype))
    e = draw(st.integers(1, 5))
    ids = torch.tensor(draw(st.lists(st.integers(0, e - 1), min_size=case.values.shape[0],
                                     max_size=case.values.shape[0])), dtype=torch.int64)
    return case, e, ids


def expert_parts(case: Case, ids: torch.Tensor) -> list[Payload]:
    out = []
    for j in range(case.parts):
        rows = torch.tensor([i for i, lab in enumerate(case.labels) if lab == j], dtype=torch.int64)
        out.append(Payload(case.values[rows], case.tokens[rows], experts=ids[rows]))
    return out


@SETTINGS
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       channel_tokens=st.booleans(), shared=st.booleans(), wide=st.booleans(),
       sparse_share=st.sampled_from([0.0, ExpertAbsMax.sparse_share, math.inf]))
def test_expert_absmax_equals_one_absmax_per_expert(data, dtype, channel_tokens, shared, wide, sparse_share):
    """Both modes: with every (expert, channel) token, and with each expert's peak token only (the profile's).
    ``shared``: every payload uses one Scratch, as the capture's do (each payload is reduced twice here, after
    others have used the buffers). ``wide``: the later half of the tokens moved 2^25 on, so a payload's tokens can
    span more than float32 ranks hold exactly (the token search then ranks in float64). ``sparse_share``: per-channel
    tokens searched over every entry at once (0), pair by pair whenever a pair can change (inf), or as configured."""
    case, e, ids = data.draw(expert_cases(dtype))
    if wide and case.tokens.numel():
        case.tokens = case.tokens + (case.tokens >= case.tokens.median()) * 2**25
    order = data.draw(orders(case.parts), label="order")
    payloads = expert_parts(case, ids)
    if shared:
        buffers = Scratch()
        for p in payloads:
            p.scratch = buffers
    def make():
        r = ExpertAbsMax(num_experts=e, channel_tokens=channel_tokens)
        r.sparse_share = sparse_share
        return r
    merged, streamed = feed(make, payloads, order)
    assert_same_state(merged, streamed)
    results = merged.results()
    assert merged.result() == {"experts": results} or any(math.isnan(r["max_abs"]) for r in results)
    for ex in range(e):
        sel = ids == ex
        ref = ref_absmax(case.values[sel], case.tokens[sel])
        res = results[ex]
        for key in ("channel", "token", "rows", "nan_count", "inf_count"):
            assert res[key] == ref[key], (ex, key, res, ref)
        assert (math.isnan(res["max_abs"]) and math.isnan(ref["max_abs"])) or res["max_abs"] == ref["max_abs"]
        if merged.absmax is not None and int(sel.sum()):
            assert merged.absmax[ex].tolist() == ref["absmax"]
        if not channel_tokens:
            continue
        got = merged.expert(ex)
        assert got.result() == res or math.isnan(res["max_abs"])
        if got.absmax is not None and int(sel.sum()):
            assert got.absmax.tolist() == ref["absmax"] and got.token.tolist() == ref["token_per_channel"]
        single = AbsMax()
        single.update(Payload(case.values[sel], case.tokens[sel]))
        assert single.result().keys() == res.keys()


def test_expert_absmax_peak_tokens_only():
    """Without per-channel tokens: ties across channels and tokens go to the smallest (token, channel), a later
    larger value takes over, states round-trip and merge, and the per-channel view is refused."""
    r = ExpertAbsMax(num_experts=2, channel_tokens=False)
    #            token: 7            5            9
    values = torch.tensor([[1.0, -3.0], [3.0, 3.0], [0.5, 2.0]])
    r.update(Payload(values, torch.tensor([7, 5, 9]), experts=torch.tensor([0, 0, 1])))
    assert [(x["max_abs"], x["token"], x["channel"]) for x in r.results()] == [(3.0, 5, 0), (2.0, 9, 1)]
    r.update(Payload(torch.tensor([[0.0, -3.0], [0.0, 2.5]]), torch.tensor([2, 3]), experts=torch.tensor([0, 1])))
    assert [(x["max_abs"], x["token"], x["channel"]) for x in r.results()] == [(3.0, 2, 1), (2.5, 3, 1)]
    assert r.state_dict().keys() == {"absmax", "peak_token", "peak_channel", "nan_count", "inf_count", "rows",
                                     "num_experts", "channel_tokens"}  # the settings a state is loaded against
    copy = ExpertAbsMax(num_experts=2, channel_tokens=False).load_state_dict(r.state_dict())
    later = ExpertAbsMax(num_experts=2, channel_tokens=False)
    later.update(Payload(torch.tensor([[9.0, 0.0]]), torch.tensor([1]), experts=torch.tensor([1])))
    assert [(x["max_abs"], x["token"], x["channel"]) for x in copy.merge(later).results()] == [(3.0, 2, 1),
                                                                                                (9.0, 1, 0)]
    with pytest.raises(ValueError, match="use results"):
        r.expert(0)
    with pytest.raises(ValueError, match="per-channel tokens"):
        r.merge(ExpertAbsMax(num_experts=2))


def test_scratch_reuses_cpu_buffers_and_recomputes_a_stale_abs():
    s = Scratch()
    a = scratch(s, "x", (4, 3), torch.float32, "cpu")
    assert scratch(s, "x", (2, 5), torch.float32, "cpu").data_ptr() == a.data_ptr()  # one buffer per role
    assert scratch(s, "y", (2, 5), torch.float32, "cpu").data_ptr() != a.data_ptr()
    assert scratch(s, "x", (4, 3), torch.float32, "meta").device.type == "meta"  # off the CPU: a new tensor ...
    assert scratch(s, "x", (4, 3), torch.float32, "cpu").data_ptr() == a.data_ptr()  # ... and the buffer stays
    p = Payload(torch.tensor([[-1.0, 2.0]]), torch.tensor([0]))
    q = Payload(torch.tensor([[3.0, -4.0]]), torch.tensor([1]))
    p.scratch = q.scratch = s
    assert p.abs().tolist() == [[1.0, 2.0]] and q.abs().tolist() == [[3.0, 4.0]]
    assert p.abs().tolist() == [[1.0, 2.0]]  # q has taken the buffer since: p's |x| is computed again


def test_expert_absmax_rejects_bad_payloads():
    r = ExpertAbsMax(num_experts=2)
    with pytest.raises(ValueError, match="grouped experts site"):
        r.update(Payload(torch.ones(2, 3), torch.arange(2)))
    with pytest.raises(ValueError, match="out of range"):
        r.update(Payload(torch.ones(2, 3), torch.arange(2), experts=torch.tensor([0, 2])))
    with pytest.raises(ValueError, match="experts"):
        Payload(torch.ones(2, 3), torch.arange(2), experts=torch.tensor([0]))
    with pytest.raises(ValueError, match="cannot merge"):
        r.merge(ExpertAbsMax(num_experts=3))
