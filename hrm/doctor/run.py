"""``hrm doctor``: every section in its own process and with its own timeout, then the report.

The ``device`` section runs first (it says which backends to check); ``parity`` runs one
process per backend (Triton under its interpreter, ``TRITON_INTERPRET=1``, where no CUDA
device is visible), every other section one process, so that a crash or a hang in one
(a kernel that faults, a compiler that never returns) still leaves the others' results.
On a GPU host with enough cores the parity processes run at once (mostly compiling).
Children run without ``TRITON_INTERPRET`` unless they need it, so availability is the
machine's real one. Sections that need CUDA report themselves skipped on a CPU without a
process. Progress (one line per check) goes to stderr.
"""

from __future__ import annotations

import collections
import json
import math
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
SECTION_TIMEOUT_S = {
    "device": 120,
    "parity": 600,
    "long_attention": 300,
    "host_reads": 600,
    "cuda_graph": 300,
    "attention_timing": 600,
    "cuda_kernels": 300,
}

PARALLEL_MIN_CPUS = 8


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


class SectionProcess:
    """``hrm.doctor.checks.run_section(spec)`` running in a fresh interpreter: its progress
    lines are echoed to stderr as they come, the rest of its stderr kept for the error
    message; :meth:`finish` waits for it until ``timeout`` seconds after its start."""

    def __init__(self, spec: dict, label: str, timeout: float, interpreter: bool = False) -> None:
        self.section, self.label, self.timeout = spec["section"], label, timeout
        self.started = time.perf_counter()
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._tmp = tempfile.TemporaryDirectory()
        self.result_path = Path(self._tmp.name) / "result.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hrm.doctor.checks", json.dumps({**spec, "result": str(self.result_path)})],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_child_env(interpreter),
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            if line.startswith(checks.PROGRESS):
                print(f"  {line[len(checks.PROGRESS) :]}", end="", file=sys.stderr, flush=True)
            elif line.strip():
                self.tail.append(line.rstrip())

    def kill(self) -> None:
        """End the section and the compile workers it started (its process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def finish(self) -> SectionRun:
        code, error = None, None
        try:
            code = self.proc.wait(timeout=max(0.0, self.started + self.timeout - time.perf_counter()))
        except subprocess.TimeoutExpired:
            error = f"timed out after {self.timeout:.0f} s"
        finally:  # a timeout or an interrupt
            self.kill()
        self.reader.join(timeout=10)
        seconds = time.perf_counter() - self.started
        if error is None and (code != 0 or not self.result_path.is_file()):
            error = f"exit code {code}: {self.tail[-1] if self.tail else 'no output'}"
        result = json.loads(self.result_path.read_text()) if error is None else None
        self._tmp.cleanup()
        return SectionRun(self.section, self.label, seconds, result, error, list(self.tail))


def run_section_process(spec: dict, label: str, timeout: float, interpreter: bool = False) -> SectionRun:
    """:class:`SectionProcess` for ``spec``, waited for."""
    return SectionProcess(spec, label, timeout, interpreter).finish()


def run_section_processes(processes: list[SectionProcess]) -> list[SectionRun]:
    """Wait for every one of ``processes`` (already running); on an interrupt end them all."""
    try:
        return [p.finish() for p in processes]
    except BaseException:
        for p in processes:
            p.kill()
        raise


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


def parallel_parity(device: torch.device) -> bool:
    """Whether the parity processes run at once: on a GPU host with at least
    ``PARALLEL_MIN_CPUS`` cores (they mostly compile kernels, on the CPU; their GPU work is
    small); one after the other elsewhere."""
    return device.type == "cuda" and (os.cpu_count() or 1) >= PARALLEL_MIN_CPUS


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


def run_doctor(
    *,
    device: str | None = None,
    quick: bool = False,
    out: str | os.PathLike = "doctor",
    backends: list[str] | None = None,
    sections: list[str] | None = None,
    section_timeout: float | None = None,
) -> tuple[dict, dict[str, Path]]:
    """Run the selected sections (all by default; ``device`` always) on ``device`` and write
    ``OUT/doctor.json`` and ``OUT/doctor.md``, again after every section (an interrupted run
    leaves what finished, ``settings.complete`` false). ``section_timeout`` caps each section
    process's timeout (seconds; default: :data:`SECTION_TIMEOUT_S`). Returns the report and
    the paths; the report's ``failures`` name every failed check (none: ``passed`` is True)."""
    dev = parse_device(device)
    backends = _subset(backends, BACKENDS, "backend")
    sections = _subset(sections, SECTIONS, "section")
    if section_timeout is not None and not section_timeout > 0:
        raise HrmError(f"--section-timeout must be a positive number of seconds, not {section_timeout}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "doctor.json", "md": out / "doctor.md"}
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    base = {"device": str(dev), "quick": quick, "backends": backends}
    plan = ["device", *(s for s in SECTIONS[1:] if sections is None or s in sections)]
    print(f"hrm doctor: {', '.join(plan)} on {dev}{' (quick)' if quick else ''}", file=sys.stderr, flush=True)
    runs: list[SectionRun] = []

    def start(section: str, label: str, interpreter: bool = False, **extra: object) -> SectionProcess:
        print(f"hrm doctor: {label} ...", file=sys.stderr, flush=True)
        timeout = min(SECTION_TIMEOUT_S[section], section_timeout or math.inf)
        return SectionProcess({**base, **extra, "section": section}, label, timeout, interpreter)

    def write(complete: bool) -> dict:
        device_run = runs[0]
        info = device_run.result["info"] if device_run.result else device_info(dev)
        report = {
            "device": info,
            "backends": device_run.result["backends"] if device_run.result else [],
            "settings": {
                "device": str(dev),
                "quick": quick,
                "backends": backends,
                "sections": plan,
                "complete": complete,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "seconds": time.perf_counter() - started,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg()[0],
            },
            "sections": [asdict(r) for r in runs],
        }
        report["failures"] = failures(report)
        if not complete:
            done = {r.section for r in runs}
            report["failures"].append(f"not run (interrupted): {', '.join(s for s in plan if s not in done)}")
        report["passed"] = not report["failures"]
        paths["json"].write_text(json.dumps(report, indent=1))
        paths["md"].write_text(markdown(report))
        return report

    def wait(processes: list[SectionProcess]) -> None:
        for result in run_section_processes(processes):
            status = f"error: {result.error}" if result.error else "done"
            print(f"hrm doctor: {result.label}: {status} ({result.seconds:.0f} s)", file=sys.stderr, flush=True)
            runs.append(result)
        write(complete=False)

    wait([start("device", "device")])
    device_run = runs[0]
    table = device_run.result["backends"] if device_run.result else []
    for section in plan[1:]:
        if section == "parity":
            todo = [
                (b["backend"], b["checked"] == "interpreter")
                for b in table
                if b["checked"] and (backends is None or b["backend"] in backends)
            ]
            labels = [f"parity ({b}{', interpreter' if interp else ''})" for b, interp in todo]
            if parallel_parity(dev):
                wait([start("parity", label, interp, backend=b) for label, (b, interp) in zip(labels, todo)])
            else:
                for label, (b, interp) in zip(labels, todo):
                    wait([start("parity", label, interp, backend=b)])
        elif section in CUDA_ONLY and dev.type != "cuda":  # skipped rows, no process needed
            runs.append(SectionRun(section, section, 0.0, checks.run_section({**base, "section": section})))
        else:
            wait([start(section, section)])
    return write(complete=True), paths
