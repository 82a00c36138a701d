"""Benchmark suites, their report and the profiler (``hrm bench``, ``hrm profile``)."""
