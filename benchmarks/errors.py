"""Errors the benchmark tool raises, translated to exit codes at the CLI boundary.

    BenchError
    ├── BenchConfigError   flags, SLOs or a workload that cannot be run (exit 2)
    ├── DatasetError       a dataset file that cannot be read or has no usable rows (exit 2)
    └── ServerError        a server the tool started exited or never became ready (exit 1)

A failed *request* is not an exception: it is recorded in its `RequestOutput.error`
(see `benchmarks.client`) and the run goes on, so one report counts every failure.
"""

from __future__ import annotations


class BenchError(Exception):
    """Base class of everything the benchmark tool raises on purpose."""

    exit_code = 1


class BenchConfigError(BenchError, ValueError):
    exit_code = 2


class DatasetError(BenchError):
    exit_code = 2


class ServerError(BenchError):
    exit_code = 1
