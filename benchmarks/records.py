"""Records passed between the workload, the client and the statistics.

Times are seconds from `time.perf_counter()`; the statistics convert to ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SampleRequest:
    """One request of a workload, identical on every side of an A/B run."""

    prompt: str
    prompt_len: int
    expected_output_len: int
    request_id: str
    kind: str = "default"  # workload class ("short"/"long" in the mixed workload)


@dataclass(slots=True)
class RequestOutput:
    """What the client observed for one request.

    `success` is True only for a stream that ended properly ([DONE]) after at least
    one token; otherwise `error` holds the reason ("http 500: ...", "stream cut: ...").
    `output_tokens` is the server's usage count when it reports one, else the
    tokenizer's count of `generated_text` (filled in by the runner).
    """

    request_id: str
    kind: str = "default"
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    generated_text: str = ""
    start_time: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first; 0 for one-token outputs."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.latency - self.ttft) / (self.output_tokens - 1)
