"""Property and edge-case tests for workbench.tracing.reducers.

Checked against brute-force references written here (plain Python loops / math.fsum), not against
the implementation itself:

* merge(split) == whole for every reducer, for random row partitions into 1..5 parts (parts may be
  empty and need not be contiguous), in any merge order; exact for AbsMax / LogHistogram /
  ExpertCounts, to float64 rounding for Moments.
* AbsMax ties go to the smallest token index (then the smallest channel for the overall peak),
  whatever the batching or merge order; tokens are arbitrary unique int64 indices.
* NaN / ±inf behaviour as documented in the module docstring.
* bf16 / fp16 / fp32 / fp64 inputs, empty updates, state_dict round trips, rejected merges and
  rejected payload shapes.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.tracing.reducers import (
    NO_TOKEN,
    AbsMax,
    ExpertCounts,
    LogHistogram,
    Moments,
    Payload,
    Reducer,
)

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,  # write nothing into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NAN, INF = math.nan, math.inf
# Few distinct magnitudes so that absmax ties (same |x| at several tokens / channels) are common.
TIE_POOL = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0]
SPECIALS = [NAN, INF, -INF]
LOW_PRECISION = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


# ----------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------


def elements(specials: bool, bound: float = 1e4):
    bound = float(torch.tensor(bound, dtype=torch.float32))  # hypothesis wants a float32-exact bound
    options = [
        st.sampled_from(TIE_POOL),
        st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=32),
    ]
    if specials:
        options.append(st.sampled_from(SPECIALS))
    return st.one_of(*options)


@dataclass
class Case:
    values: torch.Tensor  # [n, C] in the drawn dtype
    tokens: torch.Tensor  # [n] unique int64, arbitrary order and offset
    labels: list[int]  # part index of every row
    parts: int
    topk: torch.Tensor | None = None  # [n, k] for ExpertCounts
    num_experts: int = 0

    def payload(self, rows=None) -> Payload:
        if rows is None:
            return Payload(self.values, self.tokens, self.topk)
        idx = torch.tensor(rows, dtype=torch.int64)
        topk = None if self.topk is None else self.topk[idx]
        return Payload(self.values[idx], self.tokens[idx], topk)

    def part_payloads(self) -> list[Payload]:
        """One payload per part (possibly with zero rows), rows in their original order."""
        return [self.payload([i for i, lab in enumerate(self.labels) if lab == j]) for j in range(self.parts)]


@st.composite
def cases(draw, specials=True, dtype=torch.float32, max_rows=24, max_channels=5, bound=1e4, experts=False):
    n = draw(st.integers(0, max_rows))
    c = draw(st.integers(1, max_channels))
    flat = draw(st.lists(elements(specials, bound), min_size=n * c, max_size=n * c))
    values = torch.tensor(flat, dtype=torch.float64).reshape(n, c).to(dtype)
    # Unique global token indices: a shuffled, strided range with a large offset.
    offset = draw(st.integers(0, 2**40))
    stride = draw(st.integers(1, 1000))
    perm = draw(st.permutations(list(range(n))))
    tokens = torch.tensor([offset + stride * p for p in perm], dtype=torch.int64).reshape(n)
    parts = draw(st.integers(1, 5))
    labels = draw(st.lists(st.integers(0, parts - 1), min_size=n, max_size=n))
    topk, num_experts = None, 0
    if experts:
        num_experts = draw(st.integers(1, 8))
        k = draw(st.integers(1, min(3, num_experts)))
        flat_topk = draw(st.lists(st.integers(0, num_experts - 1), min_size=n * k, max_size=n * k))
        topk = torch.tensor(flat_topk, dtype=torch.int64).reshape(n, k)
    return Case(values, tokens, labels, parts, topk, num_experts)


# ----------------------------------------------------------------------------------------------
# Brute-force references
# ----------------------------------------------------------------------------------------------


def ref_absmax(values: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Per-channel and overall absmax by plain loops over float64 copies of the inputs."""
    x = values.to(torch.float64).tolist()
    toks = tokens.tolist()
    n = len(x)
    c = values.shape[1]
    best_val = [-1.0] * c
    best_tok = [NO_TOKEN] * c
    nan_count = inf_count = 0
    for i in range(n):
        for j in range(c):
            v = x[i][j]
            if math.isnan(v):
                nan_count += 1
                continue
            if math.isinf(v):
                inf_count += 1
            a = abs(v)
            if a > best_val[j] or (a == best_val[j] and toks[i] < best_tok[j]):
                best_val[j], best_tok[j] = a, toks[i]
    seen = [j for j in range(c) if best_tok[j] != NO_TOKEN]
    if seen:
        # Largest value, then smallest token, then smallest channel.
        ch = min(seen, key=lambda j: (-best_val[j], best_tok[j], j))
        overall = {"max_abs": best_val[ch], "channel": ch, "token": best_tok[ch]}
    else:
        overall = {"max_abs": NAN, "channel": -1, "token": NO_TOKEN}
    return {**overall, "rows": n, "nan_count": nan_count, "inf_count": inf_count,
            "absmax": best_val, "token_per_channel": best_tok}


def ref_moments(values: torch.Tensor):
    """count, mean, population variance per channel over finite values only (math.fsum)."""
    x = values.to(torch.float64).T.tolist()
    counts, means, vars_ = [], [], []
    for col in x:
        fin = [v for v in col if math.isfinite(v)]
        counts.append(len(fin))
        if fin:
            m = math.fsum(fin) / len(fin)
            means.append(m)
            vars_.append(math.fsum((v - m) ** 2 for v in fin) / len(fin))
        else:
            means.append(0.0)
            vars_.append(NAN)
    flat = values.to(torch.float64).flatten().tolist()
    nan_count = sum(math.isnan(v) for v in flat)
    inf_count = sum(math.isinf(v) for v in flat)
    return (torch.tensor(counts, dtype=torch.int64), torch.tensor(means, dtype=torch.float64),
            torch.tensor(vars_, dtype=torch.float64), nan_count, inf_count)


def ref_expert_counts(topk: torch.Tensor, num_experts: int, values: torch.Tensor | None = None) -> dict:
    cnt = Counter(topk.flatten().tolist())
    counts = [cnt.get(e, 0) for e in range(num_experts)]
    total = sum(counts)
    sq = sum(c * c for c in counts)  # utilization: Jain's index (sum p)^2 / (E sum p^2)
    rows = values.tolist() if values is not None else []
    return {"counts": counts, "tokens": topk.shape[0], "load": [c / total if total else 0.0 for c in counts],
            "utilization": total * total / (num_experts * sq) if sq else math.nan,
            "nonfinite_tokens": sum(any(x != x or x == math.inf for x in row) for row in rows)}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def make(kind: str, case: Case | None = None, **kw) -> Reducer:
    if kind == "expert_counts":
        return ExpertCounts(num_experts=case.num_experts if case is not None else kw.get("num_experts", 4))
    return Reducer.registry[kind](**kw)


def reduce_whole(kind: str, case: Case, **kw) -> Reducer:
    r = make(kind, case, **kw)
    r.update(case.payload())
    return r


def reduce_parts(kind: str, case: Case, order=None, **kw) -> Reducer:
    """Reduce every part separately, then merge them (in ``order``) into the first one."""
    reds = []
    for p in case.part_payloads():
        r = make(kind, case, **kw)
        r.update(p)
        reds.append(r)
    if order is not None:
        reds = [reds[i] for i in order]
    acc = reds[0]
    for r in reds[1:]:
        out = acc.merge(r)
        assert out is acc  # merge is in place and returns self
    return acc


def reduce_streaming(kind: str, case: Case, order=None, **kw) -> Reducer:
    """One reducer fed the parts one after another."""
    r = make(kind, case, **kw)
    payloads = case.part_payloads()
    if order is not None:
        payloads = [payloads[i] for i in order]
    for p in payloads:
        r.update(p)
    return r


def same_result(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y or type(x) is not type(y):
            return False
    return True


def assert_same_state(a: Reducer, b: Reducer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), (k, sa[k], sb[k])
    assert same_result(a.result(), b.result()), (a.result(), b.result())


def snapshot(r: Reducer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in r.state_dict().items()}


def check_absmax_against_ref(r: AbsMax, values: torch.Tensor, tokens: torch.Tensor) -> None:
    ref = ref_absmax(values, tokens)
    res = r.result()
    for key in ("channel", "token", "rows", "nan_count", "inf_count"):
        assert res[key] == ref[key], (key, res, ref)
    if math.isnan(ref["max_abs"]):
        assert math.isnan(res["max_abs"]), res
    else:
        assert res["max_abs"] == ref["max_abs"], (res, ref)
    assert r.absmax.dtype == torch.float64 and r.token.dtype == torch.int64
    assert r.absmax.tolist() == ref["absmax"]
    assert r.token.tolist() == ref["token_per_channel"]


def orders(k: int):
    return st.permutations(list(range(k)))


# ----------------------------------------------------------------------------------------------
# merge(split) == whole
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(case=cases(), data=st.data())
def test_absmax_merge_of_parts_equals_whole_in_any_order(case, data):
    whole = reduce_whole("absmax", case)
    check_absmax_against_ref(whole, case.values, case.tokens)
    assert_same_state(reduce_parts("absmax", case), whole)
    assert_same_state(reduce_parts("absmax", case, order=list(reversed(range(case.parts)))), whole)
    order = data.draw(orders(case.parts), label="merge order")
    assert_same_state(reduce_parts("absmax", case, order=order), whole)
    assert_same_state(reduce_streaming("absmax", case, order=order), whole)


@SETTINGS
@given(case=cases(), data=st.data())
def test_log_histogram_merge_of_parts_equals_whole_in_any_order(case, data):
    kw = data.draw(st.sampled_from([{}, {"lo": -3.0, "hi": 2.0, "num_bins": 7}, {"lo": 0.0, "hi": 1.0, "num_bins": 1}]),
                   label="edges")
    whole = reduce_whole("log_histogram", case, **kw)
    assert_same_state(reduce_parts("log_histogram", case, **kw), whole)
    order = data.draw(orders(case.parts), label="merge order")
    assert_same_state(reduce_parts("log_histogram", case, order=order, **kw), whole)
    assert_same_state(reduce_streaming("log_histogram", case, order=order, **kw), whole)
    res = whole.result()
    total = sum(res["counts"]) + res["zeros"] + res["under"] + res["over"] + res["nan_count"]
    assert total == case.values.numel()


@SETTINGS
@given(case=cases(experts=True), data=st.data())
def test_expert_counts_merge_of_parts_equals_whole_and_reference(case, data):
    whole = reduce_whole("expert_counts", case)
    got, ref = whole.result(), ref_expert_counts(case.topk, case.num_experts, case.values)
    u, ref_u = got.pop("utilization"), ref.pop("utilization")
    assert got == ref and (u == pytest.approx(ref_u) if ref["tokens"] and any(ref["counts"]) else math.isnan(u))
    assert_same_state(reduce_parts("expert_counts", case), whole)
    order = data.draw(orders(case.parts), label="merge order")
    assert_same_state(reduce_parts("expert_counts", case, order=order), whole)
    assert_same_state(reduce_streaming("expert_counts", case, order=order), whole)


def _check_moments(r: Moments, values: torch.Tensor) -> None:
    count, mean, var, nan_count, inf_count = ref_moments(values)
    assert torch.equal(r.count, count)
    scale = 1.0 + max((abs(v) for v in values.to(torch.float64).flatten().tolist() if math.isfinite(v)), default=0.0)
    seen = count > 0
    torch.testing.assert_close(r.mean[seen], mean[seen], rtol=1e-10, atol=1e-13 * scale)
    torch.testing.assert_close(r.var[seen], var[seen], rtol=1e-10, atol=1e-12 * scale * scale)
    assert torch.isnan(r.var[~seen]).all()  # documented: NaN where a channel has no finite value
    assert int(r.nan_count) == nan_count and int(r.inf_count) == inf_count


@SETTINGS
@given(case=cases(), data=st.data())
def test_moments_merge_of_parts_matches_float64_reference(case, data):
    whole = reduce_whole("moments", case)
    _check_moments(whole, case.values)
    _check_moments(reduce_parts("moments", case), case.values)
    order = data.draw(orders(case.parts), label="merge order")
    _check_moments(reduce_parts("moments", case, order=order), case.values)
    _check_moments(reduce_streaming("moments", case, order=order), case.values)


def test_moments_large_offset_small_spread_is_stable():
    # Chan's update in float64 must not lose the small variance under a large common offset.
    g = torch.Generator().manual_seed(0)
    x = (1e6 + torch.randn(4000, 3, generator=g, dtype=torch.float64))
    tokens = torch.arange(4000, dtype=torch.int64)
    parts = torch.tensor_split(torch.arange(4000), [7, 1000, 1001, 3500])
    acc = Moments()
    for idx in parts:
        r = Moments()
        r.update(Payload(x[idx], tokens[idx]))
        acc.merge(r)
    torch.testing.assert_close(acc.mean, x.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.var, x.var(0, unbiased=False), rtol=1e-9, atol=0)


# ----------------------------------------------------------------------------------------------
# AbsMax: ties, brute force, tokens
# ----------------------------------------------------------------------------------------------


def test_absmax_explicit_ties_go_to_smallest_token_in_every_split_and_order():
    # rows carry tokens (not sorted, not 0..n-1); |x| ties everywhere.
    tokens = torch.tensor([50, 30, 7, 100, 3, 12], dtype=torch.int64)
    values = torch.tensor([
        # ch0   ch1   ch2   ch3
        [2.0, 1.0, NAN, 0.0],   # token 50
        [-2.0, 2.0, 1.0, 0.0],  # token 30
        [2.0, -2.0, 1.0, 0.0],  # token 7
        [1.0, 2.0, -1.0, 0.0],  # token 100
        [0.5, 1.0, 1.0, -0.0],  # token 3
        [-2.0, 0.0, NAN, 0.0],  # token 12
    ])
    expected_tok = [7, 7, 3, 3]  # ch0: |2| at 50,30,7,12 -> 7; ch1: |2| at 30,7,100 -> 7; ch2: 1 at 30,7,3 -> 3
    expected_max = [2.0, 2.0, 1.0, 0.0]
    n = len(tokens)
    # every assignment of the 6 rows to 3 parts (729 splits), merged forwards and backwards
    for labels in itertools.product(range(3), repeat=n):
        case = Case(values, tokens, list(labels), 3)
        for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
            r = reduce_parts("absmax", case, order=order)
            assert r.token.tolist() == expected_tok, (labels, order)
            assert r.absmax.tolist() == expected_max, (labels, order)
            res = r.result()
            # overall: value 2 in ch0 and ch1, both at token 7 -> smallest channel, 0
            assert (res["max_abs"], res["channel"], res["token"]) == (2.0, 0, 7), (labels, order, res)
            assert res["nan_count"] == 2 and res["inf_count"] == 0 and res["rows"] == n


def test_absmax_overall_tie_prefers_smallest_token_then_smallest_channel():
    tokens = torch.tensor([9, 4], dtype=torch.int64)
    values = torch.tensor([[5.0, 0.0, -5.0], [0.0, -5.0, 1.0]])
    r = AbsMax()
    r.update(Payload(values, tokens))
    # ch0: 5@9, ch1: 5@4, ch2: 5@9 -> smallest token wins (ch1), not smallest channel
    assert (r.result()["channel"], r.result()["token"]) == (1, 4)
    r2 = AbsMax()
    r2.update(Payload(torch.tensor([[0.0, 5.0, -5.0]]), torch.tensor([4])))
    r2.update(Payload(torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([4 + 10**12])))
    # ch1 and ch2 both 5 at token 4 -> smallest channel (1)
    assert (r2.result()["max_abs"], r2.result()["channel"], r2.result()["token"]) == (5.0, 1, 4)


@SETTINGS
@given(case=cases(specials=True, max_rows=40, max_channels=6))
def test_absmax_result_matches_brute_force(case):
    r = AbsMax()
    r.update(case.payload())
    check_absmax_against_ref(r, case.values, case.tokens)


def test_absmax_tokens_are_not_row_positions():
    tokens = torch.tensor([2**40 + 17, 5, 2**33], dtype=torch.int64)
    r = AbsMax()
    r.update(Payload(torch.tensor([[1.0], [-3.0], [2.0]]), tokens))
    assert r.result() == {"max_abs": 3.0, "channel": 0, "token": 5, "rows": 3, "nan_count": 0, "inf_count": 0}
    r = AbsMax()
    r.update(Payload(torch.tensor([[1.0], [2.0], [-7.5]]), tokens))
    assert r.result()["token"] == 2**33
    # int32 token tensors are widened, not rejected
    r = AbsMax()
    r.update(Payload(torch.tensor([[1.0], [-2.0]]), torch.tensor([70000, 3], dtype=torch.int32)))
    assert r.result()["token"] == 3 and r.token.dtype == torch.int64


# ----------------------------------------------------------------------------------------------
# NaN / inf
# ----------------------------------------------------------------------------------------------


def test_absmax_nan_never_wins_and_is_counted():
    values = torch.tensor([[NAN, 1.0], [0.25, NAN], [NAN, -0.5]])
    r = AbsMax()
    r.update(Payload(values, torch.tensor([0, 1, 2])))
    assert r.absmax.tolist() == [0.25, 1.0]
    assert r.token.tolist() == [1, 0]
    res = r.result()
    assert (res["max_abs"], res["channel"], res["token"]) == (1.0, 1, 0)
    assert res["nan_count"] == 3 and res["inf_count"] == 0


def test_absmax_all_nan_gives_no_winner():
    r = AbsMax()
    r.update(Payload(torch.full((4, 3), NAN), torch.arange(10, 14)))
    res = r.result()
    assert math.isnan(res["max_abs"]) and res["channel"] == -1 and res["token"] == NO_TOKEN
    assert res["nan_count"] == 12 and res["rows"] == 4
    assert r.token.tolist() == [NO_TOKEN] * 3
    # a later finite value in a separate part still wins after merging
    other = AbsMax()
    other.update(Payload(torch.tensor([[0.0, NAN, NAN]]), torch.tensor([99])))
    r.merge(other)
    assert (r.result()["max_abs"], r.result()["channel"], r.result()["token"]) == (0.0, 0, 99)
    assert r.result()["nan_count"] == 14


def test_absmax_inf_wins_and_is_counted():
    values = torch.tensor([[1e30, -INF], [INF, 2.0], [-INF, INF], [NAN, 3.0]])
    tokens = torch.tensor([40, 20, 10, 5])
    r = AbsMax()
    r.update(Payload(values, tokens))
    assert r.absmax.tolist() == [INF, INF]
    assert r.token.tolist() == [10, 10]  # ch0: inf at 20 and 10; ch1: inf at 40 and 10
    res = r.result()
    assert (res["max_abs"], res["channel"], res["token"]) == (INF, 0, 10)
    assert res["inf_count"] == 4 and res["nan_count"] == 1


def test_moments_skip_non_finite_values_per_channel():
    values = torch.tensor([
        [1.0, NAN, INF, NAN],
        [2.0, 4.0, -INF, NAN],
        [NAN, 6.0, 5.0, NAN],
        [INF, 8.0, NAN, NAN],
    ], dtype=torch.float64)
    r = Moments()
    r.update(Payload(values, torch.arange(4)))
    assert r.count.tolist() == [2, 3, 1, 0]
    torch.testing.assert_close(r.mean[:3], torch.tensor([1.5, 6.0, 5.0], dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(r.var[:3], torch.tensor([0.25, 8.0 / 3.0, 0.0], dtype=torch.float64),
                               rtol=1e-15, atol=0)
    assert math.isnan(r.var[3])
    assert int(r.nan_count) == 7 and int(r.inf_count) == 3
    res = r.result()
    assert res["mean_abs_mean"] == pytest.approx((1.5 + 6.0 + 5.0) / 3)  # the channel without a finite value is
    assert res["max_std"] == pytest.approx((8.0 / 3.0) ** 0.5)  # left out (its mean 0 counted)
    assert res["nan_count"] == 7 and res["inf_count"] == 3


def test_log_histogram_bins_zeros_inf_nan_as_documented():
    h = LogHistogram()  # lo=-6, hi=6, 96 bins of width 0.125 in log10
    values = torch.tensor([[0.0, -0.0, 1e-7, 1e7], [INF, -INF, NAN, 1.0], [-1.0, 1e-6 * 1.5, 0.999e6, NAN]],
                          dtype=torch.float64)
    h.update(Payload(values, torch.arange(3)))
    res = h.result()
    assert res["zeros"] == 2
    assert res["under"] == 1  # 1e-7
    assert res["over"] == 3  # 1e7, inf, -inf
    assert res["nan_count"] == 2
    counts = res["counts"]
    assert counts[48] == 2  # |x| == 1 -> log10 = 0 -> bin (0 + 6) * 8 = 48
    assert counts[1] == 1  # 1.5e-6 -> log10 = -5.82 -> (0.18 * 8) = 1.4 -> bin 1
    assert counts[95] == 1  # 0.999e6 -> log10 = 5.9996 -> last bin
    assert sum(counts) == 4
    assert sum(counts) + res["zeros"] + res["under"] + res["over"] + res["nan_count"] == values.numel()


def _bin(v: float, lo=-6.0, hi=6.0, nb=96) -> int:
    return int(math.floor((math.log10(abs(v)) - lo) * nb / (hi - lo)))


@SETTINGS
@given(case=cases(specials=True, bound=3e38, max_rows=12, max_channels=4),
       edges=st.sampled_from([(-6.0, 6.0, 96), (-2.0, 3.0, 5), (-40.0, 40.0, 160)]))
def test_log_histogram_every_element_lands_in_a_bin_containing_it(case, edges):
    lo, hi, nb = edges
    h = LogHistogram(lo=lo, hi=hi, num_bins=nb)
    h.update(case.payload())
    flat = case.values.to(torch.float64).flatten().tolist()
    ref = Counter()
    for v in flat:
        a = abs(v)
        if math.isnan(v):
            ref["nan"] += 1
        elif a == 0:
            ref["zeros"] += 1
        elif math.isinf(a) or math.log10(a) >= hi:
            ref["over"] += 1
        elif math.log10(a) < lo:
            ref["under"] += 1
        else:
            ref["in"] += 1
            # the element must be counted in the bin whose [10**e_i, 10**e_(i+1)) holds it
            single = LogHistogram(lo=lo, hi=hi, num_bins=nb)
            single.update(Payload(torch.tensor([[v]], dtype=torch.float64), torch.tensor([0])))
            (i,) = torch.nonzero(single.counts).flatten().tolist()
            e = single.edges.tolist()
            rel = 1e-12
            assert 10 ** e[i] * (1 - rel) <= a < 10 ** e[i + 1] * (1 + rel), (v, i, e[i], e[i + 1])
    res = h.result()
    # boundary cases (|x| exactly 10**lo or 10**hi) are decided by log10 rounding: allow none to differ
    assert res["nan_count"] == ref["nan"]
    assert res["zeros"] == ref["zeros"]
    assert res["over"] == ref["over"]
    assert res["under"] == ref["under"]
    assert sum(res["counts"]) == ref["in"]
    assert sum(res["counts"]) + res["zeros"] + res["under"] + res["over"] + res["nan_count"] == len(flat)


def test_log_histogram_hand_checked_bins():
    assert _bin(1.5e-6) == 1 and _bin(1.0) == 48 and _bin(0.999e6) == 95
    h = LogHistogram()
    h.update(Payload(torch.tensor([[1.5e-6, 1.0, 0.999e6, 1e-6 * 1.0001]], dtype=torch.float64), torch.tensor([0])))
    counts = h.result()["counts"]
    assert counts[1] == 1 and counts[48] == 1 and counts[95] == 1 and counts[0] == 1
    assert sum(counts) == 4 and h.result()["under"] == 0


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(case=cases(specials=True, dtype=torch.bfloat16, bound=1e5), dtype=st.sampled_from(LOW_PRECISION))
def test_low_precision_inputs_reduce_like_their_float64_values(case, dtype):
    # re-cast the drawn values to the dtype under test (fp16 overflows 1e5 to inf: also a case)
    x = case.values.to(torch.float64).to(dtype)
    x64 = x.to(torch.float64)  # exact
    low = Case(x, case.tokens, case.labels, case.parts)
    ref = Case(x64, case.tokens, case.labels, case.parts)

    a = reduce_whole("absmax", low)
    check_absmax_against_ref(a, x64, case.tokens)
    finite_or_inf = x64[~torch.isnan(x64)].abs()
    expected = float(finite_or_inf.max()) if finite_or_inf.numel() else NAN
    got = a.result()["max_abs"]
    assert got == expected or (math.isnan(got) and math.isnan(expected))
    assert_same_state(a, reduce_whole("absmax", ref))
    assert_same_state(reduce_parts("absmax", low), reduce_whole("absmax", ref))

    assert_same_state(reduce_whole("log_histogram", low), reduce_whole("log_histogram", ref))
    assert_same_state(reduce_parts("log_histogram", low), reduce_whole("log_histogram", ref))

    m = reduce_parts("moments", low)
    _check_moments(m, x64)
    assert m.mean.dtype == torch.float64 and m.m2.dtype == torch.float64


def test_bf16_absmax_is_fp64_absmax_of_the_bf16_values():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(257, 33, generator=g) * 300).to(torch.bfloat16)
    r = AbsMax()
    r.update(Payload(x, torch.arange(1000, 1257)))
    expected = x.to(torch.float64).abs().amax(0)
    assert torch.equal(r.absmax, expected)
    assert r.result()["max_abs"] == float(x.to(torch.float64).abs().max())
    check_absmax_against_ref(r, x, torch.arange(1000, 1257))


def test_values_that_require_grad_are_accepted():
    x = torch.randn(5, 3, requires_grad=True)
    tokens = torch.arange(5)
    for kind in ("absmax", "moments", "log_histogram"):
        r = make(kind)
        r.update(Payload(x * 2, tokens))
        for v in r.state_dict().values():
            assert not v.requires_grad


# ----------------------------------------------------------------------------------------------
# empty updates and empty reducers
# ----------------------------------------------------------------------------------------------


def _empty_payload(c: int, k: int = 2) -> Payload:
    return Payload(torch.empty(0, c), torch.empty(0, dtype=torch.int64), torch.empty(0, k, dtype=torch.int64))


@pytest.mark.parametrize("kind", ["absmax", "moments", "log_histogram", "expert_counts"])
def test_empty_update_does_not_change_state(kind):
    x = torch.tensor([[1.0, -2.0, NAN, 0.0], [INF, 0.5, 3.0, -1e-9]])
    p = Payload(x, torch.tensor([11, 4]), torch.tensor([[0, 3], [1, 3]]))
    r = make(kind)
    r.update(p)
    before = snapshot(r)
    result_before = r.result()
    r.update(_empty_payload(4))
    after = r.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert same_result(result_before, r.result())


@pytest.mark.parametrize("kind", ["absmax", "moments", "log_histogram", "expert_counts"])
def test_merging_a_fresh_or_empty_reducer_is_the_identity(kind):
    x = torch.tensor([[1.0, -2.0, NAN, 0.0], [INF, 0.5, 3.0, -1e-9]])
    p = Payload(x, torch.tensor([11, 4]), torch.tensor([[0, 3], [1, 3]]))
    ref = make(kind)
    ref.update(p)

    for prepare in (lambda r: None, lambda r: r.update(_empty_payload(4))):
        empty = make(kind)
        prepare(empty)
        full = make(kind)
        full.update(p)
        assert_same_state(full.merge(empty), ref)  # full <- empty
        empty2 = make(kind)
        prepare(empty2)
        assert same_result(empty2.merge(ref).result(), ref.result())  # empty <- full


def test_fresh_absmax_result_is_sane():
    for r in (AbsMax(), AbsMax()):
        res = r.result()
        assert math.isnan(res["max_abs"])
        assert (res["channel"], res["token"], res["rows"], res["nan_count"], res["inf_count"]) == (-1, NO_TOKEN, 0, 0, 0)
        r.update(_empty_payload(3))
        res = r.result()
        assert math.isnan(res["max_abs"])
        assert (res["channel"], res["token"], res["rows"], res["nan_count"], res["inf_count"]) == (-1, NO_TOKEN, 0, 0, 0)
        assert r.token.tolist() == [NO_TOKEN] * 3


def test_fresh_other_reducers_results_are_sane():
    m = Moments()
    assert m.result()["count"] == 0
    m.update(_empty_payload(3))
    assert m.result()["count"] == 0
    assert m.count.tolist() == [0, 0, 0] and torch.isnan(m.var).all()
    h = LogHistogram()
    h.update(_empty_payload(3))
    res = h.result()
    assert res["counts"] == [0] * 96 and res["zeros"] == res["under"] == res["over"] == res["nan_count"] == 0
    e = ExpertCounts(num_experts=3)
    e.update(_empty_payload(3))
    res = e.result()
    assert math.isnan(res.pop("utilization")) and res == {"counts": [0, 0, 0], "tokens": 0, "load": [0.0, 0.0, 0.0],
                                                          "nonfinite_tokens": 0}


# ----------------------------------------------------------------------------------------------
# state_dict round trip
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(case=cases(experts=True), kind=st.sampled_from(["absmax", "moments", "log_histogram", "expert_counts"]))
def test_state_dict_round_trip_preserves_result_and_is_independent(case, kind):
    r = reduce_parts(kind, case)
    restored = make(kind, case).load_state_dict(r.state_dict())
    assert_same_state(restored, r)
    # the restored copy keeps working, independently of the original
    before = restored.result()
    extra = Payload(torch.tensor([[7.0] * case.values.shape[1]]), torch.tensor([-5 + 2**50]),
                    torch.zeros(1, case.topk.shape[1], dtype=torch.int64))
    r.update(extra)
    assert same_result(restored.result(), before)
    restored.update(extra)
    assert_same_state(restored, r)


def test_state_dict_holds_only_tensors_and_survives_torch_save(tmp_path):
    r = AbsMax()
    r.update(Payload(torch.tensor([[1.0, -4.0], [NAN, 2.0]]), torch.tensor([8, 3])))
    path = tmp_path / "absmax.pt"
    torch.save(r.state_dict(), path)
    loaded = AbsMax().load_state_dict(torch.load(path, weights_only=True))
    assert_same_state(loaded, r)


@pytest.mark.parametrize("saved,into,needle", [
    (dict(kind="router_stats", num_experts=2), dict(num_experts=8), "num_experts=2, this one has num_experts=8"),
    (dict(kind="router_stats", num_experts=2, scoring="sigmoid"), dict(num_experts=2), "sigmoid=True, this one has "
                                                                                        "sigmoid=False"),
    (dict(kind="expert_counts", num_experts=2), dict(num_experts=8), "num_experts=2, this one has num_experts=8"),
    (dict(kind="expert_absmax", num_experts=2), dict(num_experts=8), "num_experts=2, this one has num_experts=8"),
    (dict(kind="expert_absmax", num_experts=2, channel_tokens=False), dict(num_experts=2),
     "channel_tokens=False, this one has channel_tokens=True")])
def test_a_state_of_a_reducer_set_up_otherwise_is_refused(saved, into, needle):
    """A RouterStats state of 2 experts loaded into one of 8 reported a 2-expert load against log 8's entropy; a
    sigmoid router's state loaded into a softmax one, an ExpertAbsMax state without per-channel tokens into one with
    them: all taken without a word. A merge of RouterStats over other experts broadcast (1 into 4: load 0.25 each)."""
    from workbench.tracing.reducers import Reducer

    cls = Reducer.registry[saved.pop("kind")]
    with pytest.raises(ValueError, match=needle):
        cls(**into).load_state_dict(cls(**saved).state_dict())
    assert cls(**into).load_state_dict(cls(**into).state_dict())  # the same setup loads


def test_router_stats_over_other_experts_do_not_merge():
    from workbench.tracing.reducers import RouterStats

    one = RouterStats(num_experts=1)
    one.update(Payload(torch.randn(5, 1), torch.arange(5), topk=torch.zeros(5, 1, dtype=torch.long)))
    with pytest.raises(ValueError, match="cannot merge RouterStats over 1 experts into 4"):
        RouterStats(num_experts=4).merge(one)


# ----------------------------------------------------------------------------------------------
# rejected merges / updates / payloads
# ----------------------------------------------------------------------------------------------


KINDS = ["absmax", "moments", "log_histogram", "expert_counts"]


@pytest.mark.parametrize("a,b", [(a, b) for a in KINDS for b in KINDS if a != b])
def test_merging_different_reducer_types_raises_type_error(a, b):
    x = make(a)
    y = make(b)
    with pytest.raises(TypeError):
        x.merge(y)


def test_merge_absmax_into_moments_raises_type_error():
    m = Moments()
    m.update(Payload(torch.ones(2, 2), torch.arange(2)))
    a = AbsMax()
    a.update(Payload(torch.ones(2, 2), torch.arange(2)))
    with pytest.raises(TypeError):
        m.merge(a)


@pytest.mark.parametrize("other", [dict(lo=-5.0), dict(hi=7.0), dict(num_bins=95), dict(lo=-3.0, hi=3.0, num_bins=48)])
def test_log_histogram_with_different_edges_refuses_to_merge(other):
    h = LogHistogram()
    h.update(Payload(torch.ones(2, 2), torch.arange(2)))
    before = snapshot(h)
    with pytest.raises(ValueError):
        h.merge(LogHistogram(**other))
    for k, v in before.items():  # a refused merge leaves the state alone
        assert torch.equal(v, h.state_dict()[k])


@pytest.mark.parametrize("kw", [dict(lo=1.0, hi=1.0), dict(lo=2.0, hi=1.0), dict(num_bins=0)])
def test_log_histogram_rejects_bad_edges(kw):
    with pytest.raises(ValueError):
        LogHistogram(**kw)


def test_expert_counts_without_topk_raises_value_error():
    e = ExpertCounts(num_experts=4)
    with pytest.raises(ValueError):
        e.update(Payload(torch.ones(3, 4), torch.arange(3)))
    res = e.result()
    assert math.isnan(res.pop("utilization")) and res == {"counts": [0, 0, 0, 0], "tokens": 0, "load": [0.0] * 4,
                                                          "nonfinite_tokens": 0}


def test_absmax_rejects_a_change_in_channel_count():
    a = AbsMax()
    a.update(Payload(torch.ones(2, 3), torch.arange(2)))
    with pytest.raises(ValueError):
        a.update(Payload(torch.ones(2, 4), torch.arange(2, 4)))
    b = AbsMax()
    b.update(Payload(torch.ones(1, 5), torch.arange(1)))
    with pytest.raises(ValueError):
        a.merge(b)


@pytest.mark.parametrize(
    "values,tokens",
    [
        (torch.ones(4), torch.arange(4)),  # values not 2-D
        (torch.ones(2, 3, 4), torch.arange(2)),  # values 3-D
        (torch.ones(4, 3), torch.arange(3)),  # too few tokens
        (torch.ones(4, 3), torch.arange(5)),  # too many tokens
        (torch.ones(4, 3), torch.arange(4).reshape(4, 1)),  # tokens not 1-D
        (torch.ones(0, 3), torch.arange(1)),  # empty values, one token
    ],
)
def test_payload_rejects_mismatched_shapes(values, tokens):
    with pytest.raises(ValueError):
        Payload(values, tokens)


def test_payload_accepts_matching_shapes():
    p = Payload(torch.ones(4, 3), torch.arange(4), torch.zeros(4, 2, dtype=torch.int64))
    assert p.values.shape == (4, 3) and p.tokens.shape == (4,)


def test_payload_rejects_topk_with_wrong_row_count():
    with pytest.raises(ValueError):
        Payload(torch.ones(3, 4), torch.arange(3), torch.zeros(5, 2, dtype=torch.int64))


def test_moments_rejects_a_change_of_channel_count():
    m = Moments()
    m.update(Payload(torch.ones(2, 4), torch.arange(2)))
    with pytest.raises(ValueError, match="channels"):
        m.update(Payload(torch.ones(2, 1), torch.arange(2, 4)))


def test_expert_counts_reject_out_of_range_ids_and_mismatched_merges():
    c = ExpertCounts(num_experts=2)
    with pytest.raises(ValueError, match="out of range"):
        c.update(Payload(torch.ones(2, 2), torch.arange(2), torch.tensor([[0, 5], [1, 0]])))
    assert int(c.tokens) == 0 and c.counts.tolist() == [0, 0]
    with pytest.raises(ValueError, match="experts"):
        c.merge(ExpertCounts(num_experts=4))


def test_saved_state_does_not_move_with_later_updates():
    a = AbsMax()
    a.update(Payload(torch.ones(2, 3), torch.arange(2)))
    saved = a.state_dict()
    a.update(Payload(torch.full((2, 3), 5.0), torch.arange(2, 4)))
    assert int(saved["rows"]) == 2 and saved["absmax"].tolist() == [1.0, 1.0, 1.0]


def test_moments_with_zero_channels_has_a_result():
    m = Moments()
    m.update(Payload(torch.ones(3, 0), torch.arange(3)))
    assert m.result()["count"] == 0


def test_moments_of_nothing_seen_are_nan_not_zero():
    """An expert no token reached: trace.json said count 0, mean_abs_mean 0.0, max_std 0.0, as if measured."""
    m = Moments()
    m.update(Payload(torch.ones(0, 4), torch.arange(0)))
    r = m.result()
    assert r["count"] == 0 and math.isnan(r["mean_abs_mean"]) and math.isnan(r["max_std"])
    m.update(Payload(torch.full((2, 4), NAN), torch.arange(2)))
    assert math.isnan(m.result()["mean_abs_mean"]) and m.result()["nan_count"] == 8


def test_registry_maps_kinds_to_classes():
    for cls in (AbsMax, Moments, LogHistogram, ExpertCounts):
        assert Reducer.registry[cls.kind] is cls


def test_absmax_ties_with_sorted_tokens_pick_the_first_row():
    # The fast path (rows in increasing token order, as Capture emits them) must agree with the general one.
    values = torch.tensor([[1.0, -3.0, 2.0], [3.0, 3.0, -2.0], [-3.0, 1.0, 2.0], [3.0, -3.0, 0.5]])
    fast, slow = AbsMax(), AbsMax()
    fast.update(Payload(values, torch.tensor([10, 11, 12, 13])))
    slow.update(Payload(values.flip(0), torch.tensor([13, 12, 11, 10])))
    assert fast.token.tolist() == slow.token.tolist() == [11, 10, 10]
    assert torch.equal(fast.absmax, slow.absmax)


@pytest.mark.parametrize("scoring, e, k",
                         [("softmax", 8, 2), ("softmax", 64, 8), ("softmax", 96, 6), ("sigmoid", 16, 4)])
def test_router_stats_match_brute_force(scoring, e, k):
    """Per-token routing distribution (softmax of the logits, or normalised sigmoid scores), its entropy and top-k
    margin, expert counts and co-activation, against plain-Python loops; merged halves equal the whole. The
    logits include a -inf (a masked expert: probability 0, entropy term 0)."""
    from workbench.tracing.reducers import RouterStats

    g = torch.Generator().manual_seed(e)
    n = 50
    logits = torch.randn(n, e, generator=g) * 3
    if scoring == "softmax":
        logits[3, 1] = float("-inf")
    topk = torch.topk(logits, k, dim=-1).indices
    whole = RouterStats(num_experts=e, scoring=scoring)
    whole.update(Payload(logits, torch.arange(n), topk))
    a, b = RouterStats(num_experts=e, scoring=scoring), RouterStats(num_experts=e, scoring=scoring)
    a.update(Payload(logits[:20], torch.arange(20), topk[:20]))
    b.update(Payload(logits[20:], torch.arange(20, n), topk[20:]))
    merged = a.merge(b).result()
    probs, ent, margin = [], 0.0, 0.0
    for row in logits.double().tolist():
        if scoring == "softmax":
            w = [math.exp(x - max(row)) for x in row]
        else:
            w = [1 / (1 + math.exp(-x)) for x in row]
        p = [x / math.fsum(w) for x in w]
        probs.append(p)
        ent += math.fsum(-x * math.log(x) for x in p if x > 0)
        s = sorted(p, reverse=True)
        margin += s[k - 1] - s[k]
    counts = Counter(int(i) for i in topk.flatten())
    co = [[sum(1 for r in topk.tolist() if i in r and j in r) for j in range(e)] for i in range(e)]
    for got in (whole.result(), merged):
        assert got["tokens"] == n and got["counts"] == [counts[i] for i in range(e)]
        assert got["mean_prob"] == pytest.approx([math.fsum(p[i] for p in probs) / n for i in range(e)], rel=1e-12)
        assert got["mean_token_entropy"] == pytest.approx(ent / n, rel=1e-12)
        assert got["mean_topk_margin"] == pytest.approx(margin / n, rel=1e-12)
        assert whole.coactivation.tolist() == co


def test_router_rows_that_are_not_finite_are_left_out_and_counted():
    """An fp16 overflow upstream gives NaN router logits: their probabilities made mean_prob and the entropy NaN,
    and their arbitrary top-k moved the counts (+138 tokens on one expert). RouterStats leaves them out and counts
    them; ExpertCounts (routing's load: the model did route them) counts them; contrast leaves them out, said."""
    import warnings as w

    from workbench.experts.contrast import PerPromptRouting
    from workbench.tracing.reducers import RouterStats

    logits = torch.tensor([[2.0, 0.0, -1.0], [NAN, NAN, NAN], [0.5, 1.5, 0.0]])
    topk = torch.tensor([[0], [2], [1]])
    r = RouterStats(num_experts=3)
    r.update(Payload(logits, torch.arange(3), topk=topk))
    clean = RouterStats(num_experts=3)
    clean.update(Payload(logits[[0, 2]], torch.tensor([0, 2]), topk=topk[[0, 2]]))
    got, want = r.result(), clean.result()
    assert got.pop("nonfinite_tokens") == 1 and want.pop("nonfinite_tokens") == 0 and got == want
    c = ExpertCounts(num_experts=3)
    c.update(Payload(logits, torch.arange(3), topk=topk))
    assert c.result()["nonfinite_tokens"] == 1 and c.counts.tolist() == [1, 1, 1]
    per = PerPromptRouting(torch.tensor([0, 0, 1]), 2, 3)
    per.update(Payload(logits, torch.arange(3), topk=topk))
    assert per.nonfinite == 1 and per.tokens.tolist() == [1.0, 1.0] and not per.prob.isnan().any()
    with w.catch_warnings():
        w.simplefilter("error")
        RouterStats(num_experts=3).merge(r)  # merges carry the count
    assert RouterStats(num_experts=3).merge(r).result()["nonfinite_tokens"] == 1
