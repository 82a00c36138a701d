"""The markdown of an ``hrm doctor`` report: one table per section, then the verdict."""

from __future__ import annotations

import math

TITLES = {
    "parity": "Op parity vs the fp64 oracle",
    "long_attention": "Attention past 32-bit offsets",
    "host_reads": "Train step: host reads, CUDA syncs, CUDA graph",
    "cuda_graph": "Train step: host reads, CUDA syncs, CUDA graph",
    "attention_timing": "Attention timing (causal packed sequences, useful work only)",
    "cuda_kernels": "CUDA kernels (csrc/) vs Triton",
}


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _device_table(info: dict, settings: dict) -> str:
    keys = [
        ("device", "name"),
        ("type", "device_type"),
        ("compute capability", "capability"),
        ("SMs", "sm_count"),
        ("CPU cores", "cores"),
        ("torch threads", "threads"),
        ("memory (GiB)", "memory_gib"),
        ("python", "python"),
        ("torch", "torch"),
        ("triton", "triton"),
        ("CUDA", "cuda"),
        ("git commit", "git_commit"),
    ]
    rows = [[label, str(info[key])] for label, key in keys if info.get(key) is not None]
    run = (
        f"{'quick' if settings['quick'] else 'full'}, {settings['seconds']:.0f} s, load average "
        f"{settings['load_average_before']:.1f} before / {settings['load_average_after']:.1f} after"
        f"{'' if settings.get('complete', True) else ', interrupted: partial report'}"
    )
    rows.append(["run", run])
    return table(["", "value"], rows)


def _backend_table(backends: list[dict], device_type: str) -> str:
    def checked(b: dict) -> str:
        if b["checked"] == "interpreter":
            return "yes, under the Triton interpreter (TRITON_INTERPRET=1)"
        if b["checked"]:
            return "yes"
        return f"no: its kernels do not take {device_type} tensors" if b["available"] else "no"

    return table(
        ["backend", "available here", "why not", "parity checked"],
        [[b["backend"], "yes" if b["available"] else "no", b["reason"] or "", checked(b)] for b in backends],
    )


def _section_table(section: str, rows: list[dict]) -> str:
    if section == "parity":
        return table(
            ["op", "shape", "backend", "dtype", "max error", "tolerance", "result", "note"],
            [
                [
                    r["op"],
                    r.get("shape"),
                    r["backend"],
                    r["dtype"],
                    r.get("error"),
                    r.get("tolerance"),
                    r["status"],
                    r.get("note"),
                ]
                for r in rows
            ],
        )
    if section == "long_attention":
        return table(
            ["check", "max error", "tolerance", "result", "note"],
            [[r["check"], r.get("error"), r.get("tolerance"), r["status"], r.get("note")] for r in rows],
        )
    if section == "attention_timing":
        unit = next((r["unit"] for r in rows if "unit" in r), "")
        shape = next((r["shape"] for r in rows if "shape" in r), "")
        return f"Shape: {shape}.\n\n" + table(
            ["implementation", "mode", "ms", unit, "max error vs fp32 SDPA", "tolerance", "result", "note"],
            [
                [
                    r.get("impl"),
                    r["mode"],
                    f"{r['seconds'] * 1e3:.2f}" if "seconds" in r else "",
                    f"{r['rate']:.3g}" if "rate" in r else "",
                    r.get("error"),
                    r.get("tolerance"),
                    r["status"],
                    r.get("note"),
                ]
                for r in rows
            ],
        )
    return table(
        ["check", "value", "result", "note"], [[r["check"], r.get("value"), r["status"], r.get("note")] for r in rows]
    )


def markdown(report: dict) -> str:
    """The report as markdown: device and versions, backends, then each section's table
    (a section that did not finish says why), then the summary."""
    info = report["device"]
    parts = [
        f"# hrm doctor: {info.get('name', '?')}\n",
        "## Device and versions\n",
        _device_table(info, report["settings"]),
        "## Backends\n",
        _backend_table(report["backends"], info["device_type"]),
    ]
    groups: dict[str, list[dict]] = {}
    for run in report["sections"]:
        if run["section"] == "device":
            parts += [f"**FAIL** device section did not finish: {_cell(run['error'])}\n"] if run["error"] else []
        else:
            groups.setdefault(TITLES[run["section"]], []).append(run)
    counts = dict.fromkeys(("PASS", "FAIL", "SKIP", "INFO"), 0)
    for title, runs in groups.items():
        parts.append(f"## {title}\n")
        parts += [f"**FAIL** {run['label']} did not finish: {_cell(run['error'])}\n" for run in runs if run["error"]]
        rows = [r for run in runs if isinstance(run["result"], list) for r in run["result"]]
        for r in rows:
            counts[r["status"]] += 1
        if rows:
            parts.append(_section_table(runs[0]["section"], rows))
    failed = report["failures"]
    info_rows = f", {counts['INFO']} for information" if counts["INFO"] else ""
    parts.append("## Summary\n")
    parts.append(
        f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped{info_rows}: "
        f"**{'PASS' if not failed else 'FAIL'}**\n"
    )
    parts += [f"- FAIL {line}" for line in failed]
    return "\n".join(parts) + "\n"
