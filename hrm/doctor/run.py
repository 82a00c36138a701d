"""``hrm doctor``: every section in its own process and with its own timeout, then the report.

The ``device`` section runs first (it says which backends to check); ``parity`` runs one
process per backend (Triton under its interpreter, ``TRITON_INTERPRET=1``, where no CUDA
device is visible), every other section one process, so that a crash or a hang in one
(a kernel that faults, a compiler that never returns) still leaves the others' results.
Children run without ``TRITON_INTERPRET`` unless they need it, so availability is the
machine's real one. Sections that need CUDA report themselves skipped on a CPU without a
process. Progress (one line per check) goes to stderr.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import hrm
from hrm.bench.device import device_info
from hrm.doctor import CUDA_ONLY, SECTIONS, checks
from hrm.doctor.report import markdown
from hrm.errors import HrmError
from hrm.ops.dispatch import BACKENDS

# Per section process (seconds); generous: a section that needs more is stuck.
SECTION_TIMEOUT_S = {"device": 120, "parity": 600, "long_attention": 300, "host_reads": 600, "cuda_graph": 300,
                     "attention_timing": 600}


@dataclass
class SectionRun:
    """What one section process returned: its rows (the ``device`` section: a dict), or
    the error that ended it (``exit code N: last line of stderr`` or a timeout)."""

    section: str
    label: str
    seconds: float
    result: list | dict | None
    error: str | None = None
    stderr_tail: list[str] = field(default_factory=list)


def _child_env(interpreter: bool) -> dict[str, str]:
    """This environment without ``TRITON_INTERPRET`` (or with it set, for ``interpreter``),
    importing the same ``hrm`` as this process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpreter:
        env["TRITON_INTERPRET"] = "1"
    root = str(Path(hrm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_section_process(spec: dict, label: str, timeout: float, interpreter: bool = False) -> SectionRun:
    """``hrm.doctor.checks.run_section(spec)`` in a fresh interpreter; its progress lines are
    echoed to stderr as they come, the rest of its stderr kept for the error message."""
    started = time.perf_counter()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        proc = subprocess.Popen([sys.executable, "-m", "hrm.doctor.checks",
                                 json.dumps({**spec, "result": str(result_path)})],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=_child_env(interpreter), start_new_session=True)

        def pump() -> None:
            for line in proc.stderr:
                if line.startswith(checks.PROGRESS):
                    print(f"  {line[len(checks.PROGRESS):]}", end="", file=sys.stderr, flush=True)
                elif line.strip():
                    tail.append(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        code, error = None, None
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s"
        finally:  # a timeout or an interrupt: end the section and the compile workers it started
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=10)
        seconds = time.perf_counter() - started
        if error is None and (code != 0 or not result_path.is_file()):
            error = f"exit code {code}: {tail[-1] if tail else 'no output'}"
        result = json.loads(result_path.read_text()) if error is None else None
    return SectionRun(spec["section"], label, seconds, result, error, list(tail))


def parse_device(name: str | None) -> torch.device:
    """``name`` (default: ``cuda`` if a CUDA device is visible, else ``cpu``) as a device
    this machine has; :class:`HrmError` otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise HrmError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N): {e}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HrmError(f"--device {name}: no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HrmError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise HrmError(f"--device {name}: hrm doctor checks cpu and cuda devices")
    return device


def _subset(names: list[str] | None, known: tuple[str, ...], what: str) -> list[str] | None:
    if names is None:
        return None
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise HrmError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return names


def failures(report: dict) -> list[str]:
    """One line per failed check and per section that did not finish."""
    out = []
    for run in report["sections"]:
        if run["error"]:
            out.append(f"{run['label']}: did not finish: {run['error']}")
        for row in run["result"] if isinstance(run["result"], list) else []:
            if row.get("status") == checks.FAIL:
                note = f" ({row['note']})" if row.get("note") else ""
                out.append(f"{run['section']}: {row['check']}{note}")
    return out


def run_doctor(*, device: str | None = None, quick: bool = False, out: str | os.PathLike = "doctor",
               backends: list[str] | None = None, sections: list[str] | None = None) -> tuple[dict, dict[str, Path]]:
    """Run the selected sections (all by default; ``device`` always) on ``device`` and write
    ``OUT/doctor.json`` and ``OUT/doctor.md``. Returns the report and the paths; the report's
    ``failures`` name every failed check (none: ``passed`` is True)."""
    dev = parse_device(device)
    backends = _subset(backends, BACKENDS, "backend")
    sections = _subset(sections, SECTIONS, "section")
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    base = {"device": str(dev), "quick": quick, "backends": backends}
    plan = ["device", *(s for s in SECTIONS[1:] if sections is None or s in sections)]
    print(f"hrm doctor: {', '.join(plan)} on {dev}{' (quick)' if quick else ''}", file=sys.stderr, flush=True)
    runs: list[SectionRun] = []

    def run(section: str, label: str, interpreter: bool = False, **extra: object) -> SectionRun:
        print(f"hrm doctor: {label} ...", file=sys.stderr, flush=True)
        result = run_section_process({**base, **extra, "section": section}, label, SECTION_TIMEOUT_S[section],
                                     interpreter)
        status = f"error: {result.error}" if result.error else "done"
        print(f"hrm doctor: {label}: {status} ({result.seconds:.0f} s)", file=sys.stderr, flush=True)
        runs.append(result)
        return result

    device_run = run("device", "device")
    table = device_run.result["backends"] if device_run.result else []
    for section in plan[1:]:
        if section == "parity":
            for b in table:
                if b["checked"] and (backends is None or b["backend"] in backends):
                    interpreter = b["checked"] == "interpreter"
                    run("parity", f"parity ({b['backend']}{', interpreter' if interpreter else ''})",
                        interpreter=interpreter, backend=b["backend"])
        elif section in CUDA_ONLY and dev.type != "cuda":  # skipped rows, no process needed
            runs.append(SectionRun(section, section, 0.0, checks.run_section({**base, "section": section})))
        else:
            run(section, section)
    info = device_run.result["info"] if device_run.result else device_info(dev)
    report = {"device": info, "backends": table,
              "settings": {"device": str(dev), "quick": quick, "backends": backends, "sections": plan,
                           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": time.perf_counter() - started,
                           "load_average_before": load_before, "load_average_after": os.getloadavg()[0]},
              "sections": [asdict(r) for r in runs]}
    report["failures"] = failures(report)
    report["passed"] = not report["failures"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "doctor.json", "md": out / "doctor.md"}
    paths["json"].write_text(json.dumps(report, indent=1))
    paths["md"].write_text(markdown(report))
    return report, paths
