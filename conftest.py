"""Root pytest configuration: `pytest` runs the test suite (tests/), `pytest --benchmark-only` the
benchmark suite (benchmarks/), each without naming a folder."""

import pytest


def pytest_configure(config):
    # testpaths = ["tests"] applies when no path is given; a benchmark run is asked for by its flag
    if config.getoption("benchmark_only", default=False) and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        config.args = ["benchmarks"]
