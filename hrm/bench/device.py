"""What a benchmark ran on: device name, core/SM count, software versions, git commit."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(device: torch.device | str = "cpu") -> dict:
    """A JSON-able description of ``device`` and the software around it."""
    device = torch.device(device)
    info: dict = {
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    else:
        info.update(name=_cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads())
    return info


def device_slug(info: dict) -> str:
    """A file-name-safe tag such as ``cpu-amd-epyc-7b13-2c`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    name = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
    suffix = f"-{info['cores']}c" if info["device_type"] == "cpu" else ""
    return f"{info['device_type']}-{name}{suffix}"
