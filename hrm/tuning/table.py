"""Tuning tables: the JSON schema, where tables live, and the runtime lookup.

A table is what ``hrm tune`` measured on one device, ``<device-slug>.json``::

    {
      "schema": 1,
      "device": {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sm_count": 132,
                 "driver": "...", "torch": "...", "triton": "...", "cuda": "..."},
      "kernels": {
        "prefixlm_attention.fwd": {
          "source_hash": "<sha256 prefix of the kernel's source>",
          "buckets": {
            "hd128-bf16": {"config": {"block_m": 128, ...}, "time_ms": 0.41,
                           "runner_up": {"config": {...}, "time_ms": 0.43} | null,
                           "tie": false, "candidates": 40, "timed": 31,
                           "pruned": 6, "discarded": 3}
          }
        }
      }
    }

Where tables are found (:func:`table_dirs`, in this order): ``$HRM_TUNE_TABLES`` (a list of
directories); ``tune/tables/`` of the source checkout that holds the imported ``hrm``
package (looked up relative to the package, ``<hrm>/../tune/tables``: a checkout or an
editable install); ``<prefix>/share/hrm/tune/tables`` (``sysconfig``'s data path), where a
wheel installs the checkout's tables (``[tool.setuptools.data-files]`` in pyproject.toml:
``tune/`` is no Python package, so they travel as data files rather than package data); and
``<cache>/tune/tables`` (``$HRM_CACHE_DIR``, else ``$XDG_CACHE_HOME/hrm``, else
``~/.cache/hrm``), where ``hrm tune`` writes when ``hrm`` runs from an installed wheel.

Lookup (:func:`lookup`), per (kernel, bucket): the exact device's table (same device name),
then any table of the same compute capability, then nothing (the caller's heuristic default
by architecture). Entries whose kernel source hash differs from the current source are
ignored, with one warning per (table, kernel) per process. Tables are read once per
(device name, capability) and cached: no file I/O per call.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrm.errors import HrmError

SCHEMA = 1
ENV_DIRS = "HRM_TUNE_TABLES"


class StaleTuningWarning(UserWarning):
    """A tuning table entry was measured for a kernel whose source has changed since."""


# -- where ----------------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("HRM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "hrm"
    )
    return Path(root) / "tune" / "tables"


def checkout_dir() -> Path | None:
    """``tune/tables`` of the source checkout holding this ``hrm`` package, if there is one."""
    d = Path(__file__).resolve().parents[2] / "tune" / "tables"
    return d if d.is_dir() else None


def installed_dir() -> Path:
    """Where a wheel installs the tables of the checkout it was built from."""
    return Path(sysconfig.get_path("data")) / "share" / "hrm" / "tune" / "tables"


def table_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(ENV_DIRS, "").split(os.pathsep) if p]
    if (d := checkout_dir()) is not None:
        dirs.append(d)
    dirs += [installed_dir(), cache_dir()]
    return dirs


def default_output_dir() -> Path:
    """Where ``hrm tune`` writes: the checkout's ``tune/tables``, else the cache."""
    return checkout_dir() or cache_dir()


def slug(device_name: str) -> str:
    """File name of a CUDA device's table, as :func:`hrm.bench.device.device_slug` names devices."""
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


# -- schema ---------------------------------------------------------------------------------
def _fail(path: str, msg: str) -> None:
    raise HrmError(f"tuning table {path}: {msg}")


def validate(table: Any, path: str = "<table>") -> dict:
    """``table`` if it follows the schema above, else :class:`HrmError` naming the problem."""
    if not isinstance(table, dict) or table.get("schema") != SCHEMA:
        _fail(path, f"not a schema-{SCHEMA} tuning table")
    dev = table.get("device")
    if not isinstance(dev, dict) or not isinstance(dev.get("name"), str):
        _fail(path, "device.name is missing")
    if not re.fullmatch(r"\d+\.\d+", str(dev.get("capability", ""))):
        _fail(path, f"device.capability must read like '9.0', got {dev.get('capability')!r}")
    kernels = table.get("kernels")
    if not isinstance(kernels, dict):
        _fail(path, "kernels must be an object")
    for name, k in kernels.items():
        ok = isinstance(k, dict) and isinstance(k.get("source_hash"), str) and isinstance(k.get("buckets"), dict)
        if not ok:
            _fail(path, f"kernel {name}: needs source_hash and buckets")
        for bucket, e in k["buckets"].items():
            ok = isinstance(e, dict) and isinstance(e.get("config"), dict)
            ok = ok and isinstance(e.get("time_ms"), (int, float))
            if not ok:
                _fail(path, f"{name} {bucket}: needs config and time_ms")
            ru = e.get("runner_up")
            if ru is not None and not (isinstance(ru, dict) and isinstance(ru.get("config"), dict)):
                _fail(path, f"{name} {bucket}: runner_up must be null or have a config")
    return table


def new_table(device: dict) -> dict:
    return {"schema": SCHEMA, "device": dict(device), "kernels": {}}


def load_table(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HrmError(f"tuning table {path}: {e}") from e
    return validate(data, str(path))


def save_table(table: dict, path: str | Path) -> None:
    """Write ``table`` atomically (a crash leaves the previous file, so a tune resumes)."""
    path = Path(path)
    validate(table, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# -- lookup ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hit:
    config: dict
    why: str


_RESOLVED: dict[tuple[str | None, tuple[int, int]], list[tuple[str, Path, dict]]] = {}
_WARNED: set[tuple[str, str]] = set()


def clear_cache() -> None:
    """Forget the tables read so far (tests; after writing a table in this process)."""
    _RESOLVED.clear()
    _WARNED.clear()
    from hrm.ops.impl.prefixlm_attention import triton_kernels

    triton_kernels.clear_config_cache()
    from hrm.ops.common import clear_row_config_cache

    clear_row_config_cache()


def _current_hash(kernel: str) -> str | None:
    from hrm.tuning.kernels import ALL_KERNELS, source_hash

    return source_hash(ALL_KERNELS[kernel]) if kernel in ALL_KERNELS else None


def _resolve(device_name: str | None, capability: tuple[int, int]) -> list[tuple[str, Path, dict]]:
    """The tables that apply, in precedence order, with stale kernels removed (warned once)."""
    key = (device_name, tuple(capability))
    if key in _RESOLVED:
        return _RESOLVED[key]
    cap = f"{capability[0]}.{capability[1]}"
    exact, same_cap, seen = [], [], set()
    for d in table_dirs():
        for path in sorted(d.glob("*.json")) if d.is_dir() else ():
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                table = load_table(path)
            except HrmError as e:
                warnings.warn(f"ignoring {e}", StaleTuningWarning, stacklevel=2)
                continue
            if device_name is not None and table["device"]["name"] == device_name:
                exact.append(("exact device table", path, table))
            elif table["device"]["capability"] == cap:
                same_cap.append((f"table of another capability-{cap} device", path, table))
    out = []
    for source, path, table in exact + same_cap:
        kernels = {}
        for name, k in table["kernels"].items():
            current = _current_hash(name)
            if current is not None and k["source_hash"] != current:
                if (str(path), name) not in _WARNED:
                    _WARNED.add((str(path), name))
                    warnings.warn(
                        f"{path}: {name} was tuned for another version of its source "
                        f"(hash {k['source_hash']}, now {current}); ignoring it: re-run hrm tune",
                        StaleTuningWarning,
                        stacklevel=2,
                    )
                continue
            kernels[name] = k
        out.append((source, path, {**table, "kernels": kernels}))
    _RESOLVED[key] = out
    return out


def lookup(kernel: str, bucket: str, device_name: str | None, capability: tuple[int, int]) -> Hit | None:
    """The tuned config of ``kernel`` at ``bucket`` on this device, or ``None`` (use the
    heuristic default). Precedence: exact device table, then same capability."""
    for source, path, table in _resolve(device_name, capability):
        entry = table["kernels"].get(kernel, {}).get("buckets", {}).get(bucket)
        if entry is not None:
            return Hit(dict(entry["config"]), f"tuned: {source} {path.name} ({entry['time_ms']:.4g} ms)")
    return None


__all__ = [
    "ENV_DIRS",
    "SCHEMA",
    "Hit",
    "StaleTuningWarning",
    "cache_dir",
    "checkout_dir",
    "clear_cache",
    "default_output_dir",
    "installed_dir",
    "load_table",
    "lookup",
    "new_table",
    "save_table",
    "slug",
    "table_dirs",
    "validate",
]
