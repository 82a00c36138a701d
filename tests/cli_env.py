"""What the tests that run ``python -m hrm ...`` as subprocesses share."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this checkout first on the path; one thread per process: the runs are tiny, and two OpenMP
# threads slow down manyfold when something else (another test's process) takes a core
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
