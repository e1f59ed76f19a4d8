"""Named benchmark scenarios: one command each (`pdserve bench scenario NAME`)."""

SCENARIOS = {
    "pd_vs_aggregated": "benchmarks.scenarios.pd_vs_aggregated",
}
