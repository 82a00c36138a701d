"""Autotuning of the Triton kernels per GPU and the static kernel report.

- :mod:`hrm.tuning.table`: the per-device tables (schema, where they live, runtime lookup);
- :mod:`hrm.tuning.kernels`: the tunable kernels, their buckets, search spaces, source hashes;
- :mod:`hrm.tuning.tuner`: ``hrm tune`` (prune, validate, time, keep the fastest);
- :mod:`hrm.tuning.report`: ``hrm kernels report`` (ahead-of-time compile, no GPU);
- :mod:`hrm.tuning.commands`: the CLI.

See docs/tuning.md.
"""
