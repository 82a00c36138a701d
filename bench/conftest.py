"""Options of the pytest-benchmark suites in this directory (see ``test_benchmarks.py``)."""

from __future__ import annotations


def pytest_addoption(parser) -> None:
    group = parser.getgroup("hrm", "hrm benchmark shapes")
    group.addoption("--hrm-config", default="bench", help="benchmark config (hrm.config.BENCH_CONFIGS)")
    group.addoption(
        "--hrm-tokens",
        type=int,
        default=None,
        help="tokens of the packed row, for the ops and the train step (default: the config's)",
    )
