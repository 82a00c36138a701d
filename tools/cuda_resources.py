#!/usr/bin/env python3
"""Resource report of the CUDA kernels from ``ptxas -v`` output (docs/cuda.md).

Two subcommands, both run by the ``cuda_resources`` target of the top-level CMakeLists.txt:

- ``compile --log LOG -- NVCC ARGS...`` runs one ``nvcc -c ... -Xptxas -v`` compile and writes
  its diagnostics (ptxas prints its figures on stderr) to ``LOG``; exits with nvcc's status.
- ``report --out DIR LOG...`` parses the logs into ``DIR/cuda_resources.json`` (one row per
  kernel and arch: registers, spill stores/loads in bytes, stack frame, static shared memory,
  barriers) and ``DIR/cuda_resources.md`` (the same as a table); with ``--fail-on-spill`` it
  exits 1 when any kernel spills.

Standalone on purpose (no torch, no hrm import): it runs once per compile.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_BARRIERS = re.compile(r"used (\d+) barriers")


def parse_log(text: str, source: str) -> list[dict]:
    """One row per entry function compiled in ``text`` (the output of one ``nvcc -Xptxas -v``)."""
    rows: list[dict] = []
    cur: dict | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"source": source, "mangled": m.group(1), "arch": m.group(2), "stack_bytes": 0}
            cur.update(spill_stores=0, spill_loads=0, registers=None, smem_bytes=0, barriers=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack_bytes"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s, b = _SMEM.search(line), _BARRIERS.search(line)
            cur["smem_bytes"] = int(s.group(1)) if s else 0
            cur["barriers"] = int(b.group(1)) if b else 0
    return rows


def _split_top(args: str) -> list[str]:
    """``a, b<c, d>, e`` -> ``["a", "b<c, d>", "e"]`` (commas at nesting depth 0 only)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(args):
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(args[start:i].strip())
            start = i + 1
    out.append(args[start:].strip())
    return out


def short_name(demangled: str) -> str:
    """A readable kernel name: the function without namespaces or parameters, and template
    arguments longer than a type name elided (CuTe layouts run to kilobytes)."""
    name = demangled.replace("(anonymous namespace)", "anon")
    lt = name.find("<")
    if lt < 0:
        return name.split("(")[0].rsplit("::", 1)[-1].split(" ")[-1]
    depth, end = 0, len(name)
    for i in range(lt, len(name)):
        depth += {"<": 1, ">": -1}.get(name[i], 0)
        if depth == 0:
            end = i
            break
    base = name[:lt].rsplit("::", 1)[-1].split(" ")[-1]
    args = [a.replace("cutlass::", "").replace("hrm::", "") for a in _split_top(name[lt + 1 : end])]
    return f"{base}<{', '.join(a if len(a) <= 24 else '...' for a in args)}>"


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def build_report(logs: list[Path]) -> list[dict]:
    rows: list[dict] = []
    for log in logs:
        source = log.name.rsplit(".", 2)[0]  # <source stem>.<arch>.log
        rows += parse_log(log.read_text(errors="replace"), source)
    for row, name in zip(rows, demangle([r["mangled"] for r in rows])):
        row["kernel"] = short_name(name)
    return sorted(rows, key=lambda r: (r["source"], r["kernel"], r["arch"]))


def markdown(rows: list[dict]) -> str:
    head = "| source | kernel | arch | registers | spill stores / loads (B) | stack (B) | static smem (B) |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['source']} | `{r['kernel']}` | {r['arch']} | {r['registers']} | "
            f"{r['spill_stores']} / {r['spill_loads']} | {r['stack_bytes']} | {r['smem_bytes']} |"
        )
    return "\n".join(lines) + "\n"


def spills(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["spill_stores"] or r["spill_loads"]]


def _compile(log: Path, cmd: list[str]) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="run one nvcc compile, keeping its ptxas output")
    c.add_argument("--log", type=Path, required=True)
    c.add_argument("nvcc", nargs=argparse.REMAINDER)
    r = sub.add_parser("report", help="turn ptxas logs into cuda_resources.json and .md")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--fail-on-spill", action="store_true")
    r.add_argument("logs", type=Path, nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "compile":
        cmd = args.nvcc[1:] if args.nvcc[:1] == ["--"] else args.nvcc
        return _compile(args.log, cmd)
    rows = build_report(args.logs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_resources.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "cuda_resources.md").write_text(markdown(rows))
    bad = spills(rows)
    print(f"{len(rows)} kernels from {len(args.logs)} compiles, {len(bad)} spilling -> {args.out}/cuda_resources.md")
    for row in bad:
        print(f"SPILL {row['arch']} {row['kernel']}: {row['spill_stores']} B stored, {row['spill_loads']} B loaded")
    return 1 if bad and args.fail_on_spill else 0


if __name__ == "__main__":
    sys.exit(main())
