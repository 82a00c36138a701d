"""Studies across architectures: ``hrm compare`` (:mod:`hrm.study.compare`) and its
report (:mod:`hrm.study.report`)."""
