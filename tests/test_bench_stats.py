"""Statistics on hand-computed inputs: percentiles, TPOT, ITL pooling, goodput."""

from __future__ import annotations

import math
import re

import pytest

from benchmarks.arrivals import arrival_offsets
from benchmarks.errors import BenchConfigError
from benchmarks.metrics import compute_metrics, error_counts, parse_goodput, summarize
from benchmarks.records import RequestOutput


def ok(ttft: float, latency: float, tokens: int, itl: list[float]) -> RequestOutput:
    return RequestOutput(request_id="r", success=True, prompt_len=10, output_tokens=tokens,
                         ttft=ttft, latency=latency, itl=itl)


def failed(reason: str) -> RequestOutput:
    return RequestOutput(request_id="f", success=False, prompt_len=10, error=reason)


@pytest.fixture
def outputs() -> list[RequestOutput]:
    return [
        ok(0.1, 0.5, 5, [0.1] * 4),   # TPOT (0.5-0.1)/4 = 0.1
        ok(0.2, 0.6, 5, [0.1] * 4),   # TPOT 0.1
        ok(0.3, 0.7, 3, [0.2, 0.2]),  # TPOT 0.2
        ok(0.4, 0.4, 1, []),          # one token: no TPOT sample, 0 for goodput
        failed("http 500: overloaded"),
        failed("stream cut: connection ended after 2 token chunks without [DONE]"),
    ]


def test_percentiles_interpolate_linearly_in_ms() -> None:
    stats = summarize([0.1, 0.2, 0.3, 0.4], [50, 90, 99, 99.9])
    assert stats["mean"] == pytest.approx(250.0)
    assert stats["median"] == pytest.approx(250.0)
    assert stats["std"] == pytest.approx(math.sqrt(12500.0))  # population std
    assert stats["p90"] == pytest.approx(370.0)  # rank 0.9*3 = 2.7 -> 300 + 0.7*100
    assert stats["p99"] == pytest.approx(397.0)
    assert stats["p99.9"] == pytest.approx(399.7)
    assert summarize([], [99]) == {"mean": 0.0, "median": 0.0, "std": 0.0, "p99": 0.0}


def test_counts_throughputs_and_latencies(outputs: list[RequestOutput]) -> None:
    m = compute_metrics(outputs, duration_s=2.0, percentiles=[90, 99], slos_ms={})
    assert (m["completed"], m["failed"]) == (4, 2)
    assert m["total_input_tokens"] == 40 and m["total_output_tokens"] == 14
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["output_throughput"] == pytest.approx(7.0)
    assert m["total_token_throughput"] == pytest.approx(27.0)
    assert m["request_goodput"] is None
    assert m["mean_ttft_ms"] == pytest.approx(250.0)
    assert m["p90_ttft_ms"] == pytest.approx(370.0)
    # TPOT samples 100, 100, 200 ms: the one-token request has none.
    assert m["mean_tpot_ms"] == pytest.approx(400 / 3)
    assert m["median_tpot_ms"] == pytest.approx(100.0)
    assert m["p90_tpot_ms"] == pytest.approx(180.0)  # rank 1.8 -> 100 + 0.8*100
    # ITL pools every gap: eight of 100 ms and two of 200 ms.
    assert m["mean_itl_ms"] == pytest.approx(120.0)
    assert m["median_itl_ms"] == pytest.approx(100.0)
    assert m["p90_itl_ms"] == pytest.approx(200.0)
    assert m["p99_e2el_ms"] == pytest.approx(697.0)


def test_goodput_counts_requests_meeting_every_slo(outputs: list[RequestOutput]) -> None:
    both = compute_metrics(outputs, 2.0, [99], parse_goodput(["ttft:350", "tpot:150"]))
    # r1, r2 meet both; r3 misses TPOT (200 ms); r4 misses TTFT (400 ms); failures never count.
    assert both["request_goodput"] == pytest.approx(1.0)
    e2e = compute_metrics(outputs, 2.0, [99], parse_goodput(["e2el:600"]))
    assert e2e["request_goodput"] == pytest.approx(1.5)  # 500, 600 (inclusive), 400 ms


def test_failures_are_grouped_by_reason(outputs: list[RequestOutput]) -> None:
    assert error_counts(outputs) == {"http 500": 1, "stream cut": 1}


@pytest.mark.parametrize("bad", ["ttft", "speed:10", "ttft:-1", "ttft:fast"])
def test_bad_slos_are_refused(bad: str) -> None:
    with pytest.raises(BenchConfigError, match="--goodput"):
        parse_goodput([bad])


def test_arrivals_are_seeded_and_end_at_n_over_rate() -> None:
    a = arrival_offsets(50, request_rate=10.0, burstiness=0.5, seed=7)
    assert a == arrival_offsets(50, request_rate=10.0, burstiness=0.5, seed=7)
    assert a != arrival_offsets(50, request_rate=10.0, burstiness=0.5, seed=8)
    assert a == sorted(a) and a[-1] == pytest.approx(5.0)
    assert arrival_offsets(3, math.inf) == [0.0, 0.0, 0.0]
    assert arrival_offsets(4, 2.0, burstiness=math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    with pytest.raises(BenchConfigError):
        arrival_offsets(4, 0.0)


def test_ratio_table_says_which_side_is_better() -> None:
    from benchmarks.compare import ratio_table

    a = {"median_itl_ms": 20.0, "p99_itl_ms": 100.0, "request_goodput": 1.0, "failed": 0}
    b = {"median_itl_ms": 20.1, "p99_itl_ms": 50.0, "request_goodput": 0.5, "failed": 2}
    table = ratio_table(a, b, "agg", "pd", [90, 99])
    assert "| metric | agg (A) | pd (B) | B/A | better |" in table
    assert "| ITL median (ms) | 20.0 | 20.1 | 1.01x | same |" in table
    assert "| ITL p99 (ms) | 100.0 | 50.0 | 0.50x | B |" in table
    assert "| goodput (req/s) | 1 | 0.5 | 0.50x | A |" in table
    assert "| failed requests | 0 | 2 | - | A |" in table
    assert "TTFT" not in table  # metrics missing from the results are left out


def test_rounds_fold_to_medians_and_pooled_samples() -> None:
    from benchmarks.rounds import combine_rounds

    rounds = [{"label": "pd", "p99_itl_ms": v, "request_goodput": g, "request_throughput": 1.0,
               "p99_ttft_ms": 5.0, "failed": f, "goodput_slos_ms": None, "num_prompts": 32,
               "per_kind": {"short": {"p99_itl_ms": v}}, "itls": [[v]]}
              for v, g, f in ((10.0, 1.0, 0), (30.0, 0.5, 2), (20.0, 0.9, 1))]
    folded = combine_rounds(rounds)
    assert folded["label"] == "pd" and folded["rounds"] == 3
    assert folded["p99_itl_ms"] == 20.0 and folded["request_goodput"] == 0.9
    assert folded["failed"] == 1 and folded["goodput_slos_ms"] is None
    assert folded["num_prompts"] == 32 and isinstance(folded["num_prompts"], int)
    assert folded["per_kind"]["short"]["p99_itl_ms"] == 20.0
    assert folded["itls"] == [[10.0], [30.0], [20.0]]
    assert folded["round_values"]["p99_itl_ms"] == [10.0, 30.0, 20.0]
    assert combine_rounds(rounds[:1]) is rounds[0]


def test_pd_overhead_counts_merged_tokens_and_pairs_its_intervals_by_round() -> None:
    from benchmarks.pd_overhead import (Sample, ServerRun, _itl_mean, merged_tokens,
                                        paired_interval, report)

    # 5 tokens each: 4 gaps, or 3 when two tokens shared an event
    assert merged_tokens([Sample(0.1, [0.01] * 4), Sample(0.1, [0.01] * 3)], 5) == 1
    # Each round's vLLM request 1.25x faster; rounds drift 3x: the ratio stays exact.
    theirs = [Sample(0.1 * k, [0.004 * k] * 4) for k in (1, 2, 3, 1, 2, 3)]
    ours = [Sample(0.125 * k, [0.005 * k] * 4) for k in (1, 2, 3, 1, 2, 3)]
    ratio, low, high = paired_interval(ours, theirs, _itl_mean)
    assert ratio == pytest.approx(1.25) and low == pytest.approx(1.25) \
        and high == pytest.approx(1.25)
    # One slow round of ours: the interval widens around the ratio.
    ours[0] = Sample(0.125, [0.02] * 4)
    ratio, low, high = paired_interval(ours, theirs, _itl_mean)
    assert low < 1.25 < ratio < high
    timing = {"prefill-engine": 0.08, "ingress": 0.001, "route": 0.001, "prefill": 0.09}
    pd = ServerRun(40.0, samples=[Sample(0.1, [0.005] * 4, timing, 0.002, True)] * 3)
    agg = ServerRun(30.0, samples=[Sample(0.09, [0.0045] * 3)] * 3)
    vllm = ServerRun(20.0, samples=[Sample(0.08, [0.004] * 4)] * 3)
    text = report(pd, agg, 1000, 5, vllm)
    assert re.search(r"tokens sharing an event +0 +3\n", text)
    assert "0 tokens sharing an event" in text  # vLLM's
    assert "vllm_itl_ratio=1.25 vllm_itl_ratio_90=1.25-1.25" in text.splitlines()[-1]
