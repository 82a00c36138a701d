"""Autotuning tables and the static kernel report, on a CPU: the arch table's occupancy
estimate, table lookup precedence (exact device -> same capability -> defaults) and
source-hash invalidation, for the attention and the row-wise kernels (whose launchers ask the
same tables), the tuner's pruning / validation / selection with an injected timer, the
table's JSON schema, the static report (compiled for sm_80 and sm_90a), and the
``hrm tune`` / ``hrm kernels`` commands."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict

import pytest
import torch

from hrm.cli import main
from hrm.errors import HrmError
from hrm.ops.arch import ARCHS, occupancy, parse_arch, parse_archs
from hrm.ops.impl.prefixlm_attention import triton_kernels as tk
from hrm.ops.impl.rms_norm import row_tiles
from hrm.tuning import table as tt
from hrm.tuning.kernels import (
    KERNELS,
    ROW_KERNELS,
    Bucket,
    RowBucket,
    attention_bucket,
    default_config,
    default_row_config,
    row_bucket,
    row_preset_buckets,
    row_search_space,
    search_space,
    source_hash,
    space_with_default,
)
from hrm.tuning.report import check, static_report
from hrm.tuning.tuner import AttentionCase, Case, RowCase, select, tune

FWD, DQ, DKDV = (KERNELS[f"prefixlm_attention.{k}"] for k in ("fwd", "dq", "dkdv"))


def _ptxas_missing() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return shutil.which(get_ptxas(90).path) is None
    except Exception:
        return True


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """An empty tables directory that is the only one looked at; caches cleared around."""
    d = tmp_path / "tables"
    d.mkdir()
    monkeypatch.setenv(tt.ENV_DIRS, str(d))
    monkeypatch.setenv("HRM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tt, "checkout_dir", lambda: None)
    monkeypatch.setattr(tt, "installed_dir", lambda: tmp_path / "installed")
    tt.clear_cache()
    yield d
    tt.clear_cache()


def _entry(config: dict, ms: float = 1.0) -> dict:
    return {"config": config, "time_ms": ms, "runner_up": None}


def _table(name: str, capability: str, entries: dict[str, dict], hashes: dict[str, str] | None = None) -> dict:
    t = tt.new_table({"name": name, "capability": capability, "sm_count": 1})
    for kernel, buckets in entries.items():
        h = (hashes or {}).get(kernel) or source_hash({**KERNELS, **ROW_KERNELS}[kernel])
        t["kernels"][kernel] = {"source_hash": h, "buckets": buckets}
    return t


CFG_A = {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3}
CFG_B = {"block_m": 32, "block_n": 32, "num_warps": 8, "num_stages": 1}
BUCKET = attention_bucket(128, torch.bfloat16)


# -- the arch table ------------------------------------------------------------------------
def test_arch_table_limits_and_occupancy():
    assert ARCHS["sm_80"].smem_per_block == 166912 and ARCHS["sm_90a"].smem_per_block == 232448
    assert all(ARCHS[a].smem_per_block == 101376 for a in ("sm_86", "sm_89", "sm_120"))
    assert (
        parse_arch("90").name == "sm_90a" and parse_arch("8.6").name == "sm_86" and parse_arch("sm_90").name == "sm_90a"
    )
    assert [a.name for a in parse_archs("sm_80,sm_120")] == ["sm_80", "sm_120"]
    with pytest.raises(HrmError):
        parse_arch("sm_75")
    a = ARCHS["sm_80"]
    assert occupancy(a, 32, 0, 4) == (16, "threads")  # 2048 threads / 128
    assert occupancy(a, 64, 0, 4) == (8, "registers")  # 64 * 128 registers per block
    assert occupancy(a, 255, 0, 8) == (1, "registers")  # 256 regs/thread * 256 threads = 65536
    assert occupancy(a, 32, 80 * 1024, 4) == (2, "shared")  # 164 KB / (80 KB + 1 KB)
    assert occupancy(ARCHS["sm_86"], 32, 100 * 1024, 4)[0] == 0  # over the 99 KB per block


# -- lookup ------------------------------------------------------------------------------------
def test_lookup_precedence_exact_device_then_same_capability_then_defaults(tables):
    tt.save_table(_table("NVIDIA Mine", "9.0", {FWD.name: {BUCKET: _entry(CFG_A)}}), tables / "cuda-nvidia-mine.json")
    other = {FWD.name: {BUCKET: _entry(CFG_B)}, DQ.name: {BUCKET: _entry(CFG_B)}}
    tt.save_table(_table("NVIDIA Other", "9.0", other), tables / "cuda-nvidia-other.json")
    tt.save_table(_table("NVIDIA Ampere", "8.0", {DKDV.name: {BUCKET: _entry(CFG_A)}}), tables / "a.json")
    default = tk.default_attention_config(128, torch.bfloat16, "sm_90a")

    cfg, why = tk.attention_config_source(128, torch.bfloat16, (9, 0), "NVIDIA Mine")
    assert asdict(cfg.fwd) == CFG_A and "exact device" in why["fwd"]  # the exact table wins over same-capability
    assert asdict(cfg.dq) == CFG_B and "another capability-9.0 device" in why["dq"]
    assert cfg.dkdv == default.dkdv and "heuristic default for sm_90a" in why["dkdv"]  # 8.0's table never applies
    cfg, _ = tk.attention_config_source(128, torch.bfloat16, (9, 0), "NVIDIA Unknown")
    assert asdict(cfg.fwd) in (CFG_A, CFG_B) and asdict(cfg.dq) == CFG_B
    cfg, why = tk.attention_config_source(64, torch.bfloat16, (9, 0), "NVIDIA Mine")  # another bucket: defaults
    assert cfg == tk.default_attention_config(64, torch.bfloat16, "sm_90a")
    assert tk.attention_config(128, torch.bfloat16, None) == tk._INTERPRETER_CONFIG  # the interpreter: no tables


def test_a_config_with_unknown_fields_falls_back_to_the_default(tables):
    bad = {**CFG_A, "num_ctas": 2}
    tt.save_table(_table("NVIDIA Mine", "9.0", {FWD.name: {BUCKET: _entry(bad)}}), tables / "m.json")
    with pytest.warns(UserWarning, match="num_ctas"):
        cfg, why = tk.attention_config_source(128, torch.bfloat16, (9, 0), "NVIDIA Mine")
    assert cfg == tk.default_attention_config(128, torch.bfloat16, "sm_90a") and "heuristic" in why["fwd"]


def test_lookup_reads_tables_once(tables, monkeypatch):
    tt.save_table(_table("NVIDIA Mine", "9.0", {FWD.name: {BUCKET: _entry(CFG_A)}}), tables / "m.json")
    reads = []
    real = tt.load_table
    monkeypatch.setattr(tt, "load_table", lambda p: reads.append(p) or real(p))
    for _ in range(3):
        tk.attention_config(128, torch.bfloat16, (9, 0), "NVIDIA Mine")
        tk.attention_config(64, torch.bfloat16, (9, 0), "NVIDIA Mine")
    assert len(reads) == 1


def test_stale_source_hash_is_ignored_with_one_warning(tables):
    stale = {FWD.name: "0" * 16}
    entries = {FWD.name: {BUCKET: _entry(CFG_A)}, DQ.name: {BUCKET: _entry(CFG_A)}}
    tt.save_table(_table("NVIDIA Mine", "9.0", entries, stale), tables / "m.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg, why = tk.attention_config_source(128, torch.bfloat16, (9, 0), "NVIDIA Mine")
        tk.attention_config_source(64, torch.bfloat16, (9, 0), "NVIDIA Mine")
        tk.attention_config_source(128, torch.bfloat16, (9, 0), "NVIDIA Another")  # same table, same capability
    stale_warnings = [w for w in caught if issubclass(w.category, tt.StaleTuningWarning)]
    assert len(stale_warnings) == 1 and "prefixlm_attention.fwd" in str(stale_warnings[0].message)
    assert cfg.fwd == tk.default_attention_config(128, torch.bfloat16, "sm_90a").fwd  # the stale entry is ignored
    assert asdict(cfg.dq) == CFG_A and "tuned" in why["dq"]  # the current one is used


# -- the table's schema --------------------------------------------------------------------------
def test_table_file_names_follow_the_bench_device_slug():
    from hrm.bench.device import device_slug

    info = {"device_type": "cuda", "name": "NVIDIA H100 80GB HBM3"}
    assert tt.slug(info["name"]) == device_slug(info) == "cuda-nvidia-h100-80gb-hbm3"


def test_table_round_trips_through_json(tables):
    t = _table("NVIDIA Mine", "9.0", {FWD.name: {BUCKET: {**_entry(CFG_A, 0.5), "runner_up": _entry(CFG_B, 0.6)}}})
    t["device"].update(driver="1.2", torch="2", triton="3")
    path = tables / "t.json"
    tt.save_table(t, path)
    assert tt.load_table(path) == json.loads(json.dumps(t))
    for bad in (
        {"schema": 2},
        {**t, "device": {"name": "x", "capability": "9"}},
        {**t, "kernels": {FWD.name: {"buckets": {}}}},
        {**t, "kernels": {FWD.name: {"source_hash": "h", "buckets": {BUCKET: {"config": CFG_A}}}}},
    ):
        with pytest.raises(HrmError):
            tt.validate(bad)


# -- the tuner's decisions, with an injected timer -----------------------------------------------
def _cands(n: int) -> list[dict]:
    return [{"block_m": 16 * (i + 1), "block_n": 16, "num_warps": 4, "num_stages": 1} for i in range(n)]


def test_select_discards_wrong_results_prunes_statically_and_records_runner_up():
    c = _cands(6)
    times = {0: 3.0, 1: 0.5, 2: 0.1, 3: 2.0, 4: 1.0, 5: 2.0}  # 1: wrong; 2: spills; 4: raises
    idx = lambda cfg: c.index(cfg)
    ran, timed = [], []

    def static(cfg):
        return "spills 8 bytes" if idx(cfg) == 2 else None

    def check(cfg):
        ran.append(idx(cfg))
        if idx(cfg) == 4:
            raise RuntimeError("out of resources")
        return idx(cfg) != 1

    def time(cfg):
        timed.append(idx(cfg))
        return times[idx(cfg)]

    e = select(c, static, check, time)
    assert 2 not in ran and 2 not in timed  # pruned before running or timing
    assert 1 not in timed and 4 not in timed  # wrong or failing: never timed, though fastest
    assert e["config"] == c[3] and e["time_ms"] == 2.0  # 3 and 5 tie: the earlier wins
    assert e["runner_up"] == {"config": c[5], "time_ms": 2.0} and e["tie"] is True
    assert (e["candidates"], e["timed"], e["pruned"], e["discarded"]) == (6, 3, 1, 2)
    assert {d["reason"] for d in e["discarded_examples"]} == {
        "output differs from the reference",
        "RuntimeError: out of resources",
    }
    assert select(c, lambda cfg: "too much shared memory", check, time) is None
    one = select(c[:1], lambda cfg: None, lambda cfg: True, lambda cfg: 1.5)
    assert one["runner_up"] is None and one["tie"] is False


class FakeCase(Case):
    def __init__(self, log, key):
        self.log, self.key = log, key

    def static(self, configs):
        return [("needs 200000 B of shared memory" if c["block_m"] == 32 else None) for c in configs]

    def precompile(self, configs, log=None):
        self.log.append(("precompile", [c["block_m"] for c in configs]))
        return len(configs)

    def check(self, config):
        self.log.append(("check", config["block_m"]))
        return config["block_m"] != 48  # a wrong-but-fastest candidate

    def time(self, config):
        self.log.append((self.key, config["block_m"]))
        return {16: 2.0, 32: 0.1, 48: 0.05, 64: 1.0}[config["block_m"]]


def test_tune_writes_after_each_bucket_and_resumes(tmp_path):
    path = tmp_path / "cuda-fake.json"
    device = {"name": "Fake GPU", "capability": "9.0", "sm_count": 1}
    buckets = [Bucket(64, "bf16"), Bucket(128, "bf16")]
    log = []
    space = lambda k, b: _cands(4)

    def make_case(k, b):
        if log:  # interrupted after the first bucket
            raise KeyboardInterrupt
        return FakeCase(log, (k.name, b.key))

    with pytest.raises(KeyboardInterrupt):
        tune([FWD], buckets, path, device, make_case, space=space, progress=False)
    # what the static report leaves (32 pruned) is compiled first, then checked; what passes
    # the check is timed (48 computes a wrong result)
    bucket = (FWD.name, "hd64-bf16")
    assert log == [("precompile", [16, 48, 64])] + [
        e for m in (16, 48, 64) for e in [("check", m)] + ([(bucket, m)] if m != 48 else [])
    ]
    saved = tt.load_table(path)
    assert list(saved["kernels"][FWD.name]["buckets"]) == ["hd64-bf16"]  # written before the interruption
    e = saved["kernels"][FWD.name]["buckets"]["hd64-bf16"]
    assert e["config"]["block_m"] == 64 and e["runner_up"]["config"]["block_m"] == 16  # 48 wrong, 32 pruned

    made = []
    table = tune(
        [FWD],
        buckets,
        path,
        device,
        lambda k, b: made.append(b.key) or FakeCase(log, b.key),
        space=space,
        progress=False,
    )
    assert made == ["hd128-bf16"]  # the done bucket is skipped
    assert set(table["kernels"][FWD.name]["buckets"]) == {"hd64-bf16", "hd128-bf16"}
    assert table["kernels"][FWD.name]["source_hash"] == source_hash(FWD)
    assert tt.load_table(path) == table


class _FakeJit:  # stands in for a triton JITFunction: precompile only passes it through
    def __init__(self, name):
        self.name = name


def test_precompile_records_launches_then_compiles_each_kernel_once_on_the_pool(monkeypatch):
    """hrm.tuning.precompile with Triton's ``JITFunction._do_compile`` stubbed: while the
    launches run, a compile is recorded and the launch skipped (no kernel comes back); then
    each distinct (kernel, device, key) compiles once, with warmup=True, on pool threads; a
    launch that raises or a kernel that fails to compile is left to the first real launch."""
    pytest.importorskip("triton")
    import threading

    from triton.runtime.jit import JITFunction

    from hrm.tuning import precompile as pc

    monkeypatch.setattr("hrm.ops.common.interpreting", lambda: False)
    compiled, threads = [], set()

    def fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        if key == "broken":
            raise RuntimeError("does not compile")
        compiled.append((self.name, key, warmup))
        threads.add(threading.current_thread().name)
        return object()

    monkeypatch.setattr(JITFunction, "_do_compile", fake_compile)
    fwd, bwd = _FakeJit("fwd"), _FakeJit("bwd")
    seen = []

    def launch(fn, *keys):
        def run():
            for key in keys:  # what JITFunction.run does on a cache miss
                seen.append(JITFunction._do_compile(fn, key, "sig", 0, {}, None, {}, False))

        return run

    def raises():
        raise ValueError("a candidate that cannot launch")

    launches = [launch(fwd, "a"), raises, launch(bwd, "a", "b"), launch(fwd, "a"), launch(fwd, "broken")]
    lines = []
    assert pc.precompile(launches, workers=2, log=lines.append) == 3
    assert seen == [None] * 5 and JITFunction._do_compile is fake_compile  # recorded, then restored
    assert sorted(compiled) == [("bwd", "a", True), ("bwd", "b", True), ("fwd", "a", True)]
    assert threading.current_thread().name not in threads
    assert lines and lines[0].startswith("precompiled 3 kernels in ")


def test_precompile_runs_nothing_under_the_interpreter():
    from hrm.tuning.precompile import precompile

    if not tk.interpreting():
        pytest.skip("checks the interpreter's no-op")
    ran = []
    assert precompile([lambda: ran.append(1)]) == 0 and ran == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles real kernels for the GPU here")
def test_precompiled_candidates_launch_without_compiling():
    """On a GPU: after an attention case's precompile, checking its candidates compiles
    nothing more (each JIT kernel's cache holds what the checks launch)."""
    from triton.runtime.jit import JITFunction

    configs = [
        {"block_m": 32, "block_n": 64, "num_warps": 4, "num_stages": 2},
        {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3},
    ]
    case = AttentionCase(DKDV, Bucket(64, "bf16"), torch.device("cuda"), tokens=2048, heads=2)
    assert case.precompile(configs) >= len(configs)
    original, calls = JITFunction._do_compile, []

    def counting(self, *args):
        calls.append(self)
        return original(self, *args)

    JITFunction._do_compile = counting
    try:
        assert all(case.check(c) for c in configs)
    finally:
        JITFunction._do_compile = original
    assert calls == []


@pytest.mark.skipif(not tk.interpreting(), reason="runs the kernels under the Triton interpreter")
def test_attention_case_validates_real_kernels_against_the_reference():
    """The GPU path's check(), run by the interpreter on a CPU: a config is accepted when the
    launchers' output matches the fp32 reference, rejected when it does not."""
    pytest.importorskip("triton")
    cfg = {"block_m": 16, "block_n": 16, "num_warps": 1, "num_stages": 1}
    for kernel, outs in ((FWD, ("out",)), (DQ, ("dq",)), (DKDV, ("dk", "dv"))):
        case = AttentionCase(kernel, Bucket(64, "fp32"), torch.device("cpu"), tokens=40, heads=2, capability=(8, 0))
        assert case.check(cfg)
        assert set(case._run(cfg)[1]()) == set(outs)
        case.ref[outs[-1]] = case.ref[outs[-1]] + 0.5  # a wrong output: discarded
        assert not case.check(cfg)


@pytest.mark.skipif(not tk.interpreting() or _ptxas_missing(), reason="interpreter run + ahead-of-time compile")
def test_tune_end_to_end_with_real_kernels_and_an_injected_timer(tmp_path):
    """hrm tune's whole path but do_bench: static compile for sm_80, interpreter runs checked
    against the reference, an injected timer, the table written and read back."""
    pytest.importorskip("triton")

    class Timed(AttentionCase):
        def time(self, config):
            return float(config["block_n"])

    space = lambda k, b: [
        {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 2},
        {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1},
    ]
    device = {"name": "Interpreted GPU", "capability": "8.0", "sm_count": 1}
    make = lambda k, b: Timed(k, b, torch.device("cpu"), tokens=40, heads=2, capability=(8, 0))
    path = tmp_path / "t.json"
    table = tune([FWD], [Bucket(64, "fp32")], path, device, make, space=space, progress=False)
    e = table["kernels"][FWD.name]["buckets"]["hd64-fp32"]
    assert e["config"]["block_n"] == 16 and e["runner_up"]["config"]["block_n"] == 32
    assert (e["timed"], e["pruned"], e["discarded"]) == (2, 0, 0)
    assert tt.load_table(path) == table


def test_search_space_holds_the_defaults_and_is_bounded():
    for b in (Bucket(64, "bf16"), Bucket(128, "bf16"), Bucket(64, "fp32"), Bucket(128, "fp32")):
        for k in KERNELS.values():
            space = search_space(k, b)
            assert 0 < len(space) <= 96 and len({tuple(c.items()) for c in space}) == len(space)
            for arch in ARCHS:
                full = space_with_default(k, b, arch)
                assert full[0] == default_config(k, b, arch) and len(full) in (len(space), len(space) + 1)


# -- the static report ---------------------------------------------------------------------------
@pytest.mark.skipif(_ptxas_missing(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_static_report_compiles_defaults_for_sm80_and_sm90a():
    pytest.importorskip("triton")
    archs = [ARCHS["sm_80"], ARCHS["sm_90a"]]
    rows = static_report(archs, [Bucket(64, "bf16")], defaults_only=False, sample=1, row_kernels=False)
    defaults = [r for r in rows if r["default"]]
    assert len(defaults) == 2 * 4 and len(rows) == 2 * (4 + 3)  # 4 kernels at defaults + 1 sampled config of 3
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90a"}
    for r in rows:
        assert {"kernel", "arch", "config", "default", "registers", "spill_bytes", "shared_bytes", "occupancy"} <= set(
            r
        )
    assert check(rows) == [], rows
    assert all(r["occupancy"] >= 1 and r["spill_bytes"] == 0 for r in defaults)
    fwd = next(r for r in defaults if r["kernel"] == "prefixlm_attention.fwd" and r["arch"] == "sm_90a")
    assert fwd["config"] == {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3}


def test_static_report_check_fails_on_a_spilling_default():
    def fake_compile(specs, capability):
        return [
            {"num_warps": s.num_warps, "registers": 255, "spill_stores": 64 if "fwd" in s.name else 0, "spill_loads": 0}
            | {"shared_bytes": 1024, "error": None}
            for s in specs
        ]

    rows = static_report([ARCHS["sm_80"]], [Bucket(64, "bf16")], row_kernels=False, compile_fn=fake_compile)
    problems = check(rows)
    assert len(problems) == 1 and "prefixlm_attention.fwd" in problems[0] and "spills 64 bytes" in problems[0]

    def overflowing(specs, capability):
        return [{**r, "spill_stores": 0, "shared_bytes": 120_000} for r in fake_compile(specs, capability)]

    rows = static_report([ARCHS["sm_86"]], [Bucket(64, "bf16")], row_kernels=False, compile_fn=overflowing)
    assert len(check(rows)) == 4 and all("sm_86 allows 101376" in p for p in check(rows))


def test_hrm_kernels_report_exits_1_on_a_spilling_default(monkeypatch, tmp_path, capsys):
    import hrm.ops.aot

    def fake(specs, capabilities, jobs=None):
        spill = lambda s: 16 if s.name.startswith("dq") else 0
        return [
            {"num_warps": s.num_warps, "registers": 96, "spill_stores": spill(s), "spill_loads": 0}
            | {"shared_bytes": 2048, "error": None}
            for s in specs
        ]

    monkeypatch.setattr(hrm.ops.aot, "compile_report", fake)
    out = tmp_path / "report.json"
    args = ["kernels", "report", "--arch", "sm_80", "--presets", "bench", "--dtypes", "bf16", "--no-row-kernels"]
    assert main([*args, "--defaults-only", "--json", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prefixlm_attention.dq" in err[0] and "spills 16 bytes" in err[0]
    rows = json.loads(out.read_text())
    assert len(rows) == 4
    for r in rows:
        assert r["occupancy"] == occupancy(ARCHS["sm_80"], 96, 2048, r["config"]["num_warps"])[0] >= 1


# -- the commands --------------------------------------------------------------------------------
def test_hrm_tune_without_a_gpu_exits_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["tune"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "no CUDA GPU" in captured.err


def test_hrm_kernels_show_on_cpu(tables, capsys):
    assert main(["kernels", "show", "--arch", "sm_86,sm_90a", "--presets", "bench", "--dtypes", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "the Triton interpreter" in out and "interpreter's config" in out
    assert "--arch sm_86" in out and "heuristic default for sm_86" in out and "heuristic default for sm_90a" in out


# -- the row-wise kernels ------------------------------------------------------------------------
RMS_FWD = ROW_KERNELS["rms_norm.fwd"]
ROW_CFG = {"block_rows": 2, "num_warps": 2}


class _Recorder:
    """Stands in for a @jit kernel: records each launch's grid and keywords."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((grid, kw))


def _fake_gpu(monkeypatch, capability=(9, 0), name="NVIDIA Mine"):
    """A CUDA device the row-wise lookup believes in: a tensor-like on cuda:0, that
    capability and name, outside the interpreter."""
    from types import SimpleNamespace

    from hrm.ops import common

    monkeypatch.setattr(common, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(common, "_ROW_DEVICES", {})
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)


def test_row_lookup_precedence_on_a_faked_gpu(tables, monkeypatch):
    from hrm.ops.common import row_config_source, tuned_row_config

    w1024, w256 = row_bucket(1024, torch.bfloat16), row_bucket(256, torch.bfloat16)
    mine = {RMS_FWD.name: {w1024: _entry(ROW_CFG)}}
    other = {RMS_FWD.name: {w1024: _entry({"block_rows": 8, "num_warps": 16}), w256: _entry(ROW_CFG)}}
    tt.save_table(_table("NVIDIA Mine", "9.0", mine), tables / "mine.json")
    tt.save_table(_table("NVIDIA Other", "9.0", other), tables / "other.json")
    t = _fake_gpu(monkeypatch)
    default = row_tiles(8192, 1024, "gpu")[1::2]  # what the launcher picks today: (4, 8)
    assert tuned_row_config(RMS_FWD.name, 1024, t, *default) == (2, 2)  # the exact device's table
    assert tuned_row_config(RMS_FWD.name, 256, t, 16, 8) == (2, 2)  # another capability-9.0 device
    assert tuned_row_config(RMS_FWD.name, 512, t, 8, 8) == (8, 8)  # no entry: the launcher's default
    assert tuned_row_config("rms_norm.bwd", 1024, t, *default) == default  # another kernel: untouched
    _, why = row_config_source(RMS_FWD.name, 1024, torch.bfloat16, (9, 0), "NVIDIA Mine")
    assert "exact device" in why
    assert row_config_source(RMS_FWD.name, 1024, torch.bfloat16, (8, 0), None)[0] is None  # other capability
    cpu = type(t)(device=torch.device("cpu"), dtype=torch.bfloat16)
    assert tuned_row_config(RMS_FWD.name, 1024, cpu, *default) == default  # not on a GPU: no table


def test_row_lookup_is_cached_and_stale_entries_warn_once(tables, monkeypatch):
    from hrm.ops.common import tuned_row_config

    entries = {RMS_FWD.name: {row_bucket(1024, torch.bfloat16): _entry(ROW_CFG)}}
    tt.save_table(_table("NVIDIA Mine", "9.0", entries, {RMS_FWD.name: "0" * 16}), tables / "m.json")
    t = _fake_gpu(monkeypatch)
    reads = []
    real = tt.load_table
    monkeypatch.setattr(tt, "load_table", lambda p: reads.append(p) or real(p))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert tuned_row_config(RMS_FWD.name, 1024, t, 4, 8) == (4, 8)  # stale: the default
            tuned_row_config(RMS_FWD.name, 2048, t, 2, 8)
    assert len(reads) == 1
    assert len([w for w in caught if issubclass(w.category, tt.StaleTuningWarning)]) == 1


def test_row_launcher_takes_forced_tiles_and_interpreter_tiles_stay(tables, monkeypatch):
    """The launcher asks the lookup: a forced (tuner) config changes its grid, block_rows and
    warps; without one, on a CPU, its tiles are today's whatever the tables say."""
    from hrm.ops.common import forced_row_config, tile_target
    from hrm.ops.impl import rms_norm

    entries = {RMS_FWD.name: {row_bucket(64, torch.float32): _entry(ROW_CFG)}}
    tt.save_table(_table("NVIDIA Mine", "9.0", entries), tables / "m.json")
    rec = _Recorder()
    monkeypatch.setattr(rms_norm, "_rms_norm_fwd_kernel", rec)
    x = torch.randn(10, 64)
    rms_norm.rms_norm_forward(x, None, 1e-6)
    grid, block_rows, _, num_warps = row_tiles(10, 64, tile_target())
    assert rec.launches[-1][0] == grid
    assert (rec.launches[-1][1]["BLOCK_ROWS"], rec.launches[-1][1]["num_warps"]) == (block_rows, num_warps)
    with forced_row_config(RMS_FWD.name, ROW_CFG):
        rms_norm.rms_norm_forward(x, None, 1e-6)
    assert rec.launches[-1][0] == (5,) and rec.launches[-1][1]["BLOCK_ROWS"] == 2
    assert rec.launches[-1][1]["num_warps"] == 2


def test_row_search_spaces_hold_the_defaults_first():
    for k in ROW_KERNELS.values():
        for b in row_preset_buckets(k, ["bench", "B"], ["bf16", "fp32"]):
            space = row_search_space(k, b)
            assert space[0] == default_row_config(k, b) and 0 < len(space) <= 32
            assert len({tuple(c.items()) for c in space}) == len(space)
            assert all(c["num_warps"] in (2, 4, 8, 16) and c["block_rows"] & (c["block_rows"] - 1) == 0 for c in space)
    assert [b.key for b in row_preset_buckets(ROW_KERNELS["swiglu.fwd"], ["bench", "B"], ["bf16"])] == [
        "w768-bf16",
        "w2816-bf16",
    ]
    assert row_preset_buckets(ROW_KERNELS["linear_cross_entropy.chunk"], ["B"], ["bf16"])[0].width == 151808


@pytest.mark.skipif(not tk.interpreting(), reason="runs the kernels under the Triton interpreter")
def test_row_case_validates_against_the_reference_and_tune_discards_a_wrong_candidate(tmp_path):
    """RowCase.check under the interpreter for every row-wise kernel (a perturbed reference
    fails it); then tune() on rms_norm.fwd with an injected timer: the fastest candidate
    computes a wrong result (its output corrupted) and is discarded."""
    pytest.importorskip("triton")
    widths = {"hidden": 64, "intermediate": 64, "qkv": 128, "vocab": 300}
    for k in ROW_KERNELS.values():
        case = RowCase(k, RowBucket(widths[k.width], "fp32"), torch.device("cpu"), rows=6, capability=(8, 0))
        assert case.check(ROW_CFG) and case.check({"block_rows": 8, "num_warps": 4})
        name = list(case._outputs())[-1]
        case.ref[name] = case.ref[name] + 0.5
        assert not case.check(ROW_CFG)

    fast_but_wrong = {"block_rows": 1, "num_warps": 4}

    class Timed(RowCase):
        def static(self, configs):
            return [None] * len(configs)

        def check(self, config):
            ok = super().check(config)
            if config == fast_but_wrong:  # what a miscompiled tile would do
                self.ref["y"] = self.ref["y"] + 1.0
                ok = super().check(config)
                self.ref["y"] = self.ref["y"] - 1.0
            return ok

        def time(self, config):
            return 0.1 if config == fast_but_wrong else float(config["block_rows"])

    space = lambda k, b: [{"block_rows": 8, "num_warps": 4}, fast_but_wrong, ROW_CFG]
    device = {"name": "Interpreted GPU", "capability": "8.0", "sm_count": 1}
    make = lambda k, b: Timed(k, b, torch.device("cpu"), rows=6, capability=(8, 0))
    path = tmp_path / "t.json"
    table = tune([RMS_FWD], lambda k: [RowBucket(64, "fp32")], path, device, make, space=space, progress=False)
    e = table["kernels"][RMS_FWD.name]["buckets"]["w64-fp32"]
    assert e["config"] == ROW_CFG and e["runner_up"]["config"]["block_rows"] == 8
    assert (e["timed"], e["discarded"]) == (2, 1) and e["discarded_examples"][0]["config"] == fast_but_wrong
    assert table["kernels"][RMS_FWD.name]["source_hash"] == source_hash(RMS_FWD)
    assert tt.load_table(path) == json.loads(json.dumps(table))


def test_table_with_row_entries_round_trips_through_json(tables):
    entries = {
        FWD.name: {BUCKET: _entry(CFG_A)},
        RMS_FWD.name: {"w1024-bf16": {**_entry(ROW_CFG, 0.01), "runner_up": _entry({**ROW_CFG, "num_warps": 4})}},
        "linear_cross_entropy.chunk": {"w151808-bf16": _entry({"block_rows": 1, "num_warps": 16})},
    }
    t = _table("NVIDIA Mine", "9.0", entries)
    tt.save_table(t, tables / "t.json")
    assert tt.load_table(tables / "t.json") == json.loads(json.dumps(t))
    assert tt.lookup(RMS_FWD.name, "w1024-bf16", "NVIDIA Mine", (9, 0)).config == ROW_CFG


def test_static_report_samples_the_row_search_spaces():
    from hrm.tuning.report import jobs_for

    jobs = jobs_for([ARCHS["sm_80"]], [Bucket(64, "bf16")], defaults_only=False, sample=1, row_kernels=True)
    row_space = [j for j in jobs if j[1].startswith("w") and not j[3]]
    assert {j[2].name.split()[0] for j in row_space} == {k.spec for k in ROW_KERNELS.values()}
    assert {j[1] for j in row_space} >= {"w256-bf16", "w1536-bf16", "w32000-bf16"}  # bench and XL widths
    assert len(row_space) == 2 * len(ROW_KERNELS)  # --sample 1: one candidate per (kernel, bucket)


@pytest.mark.skipif(_ptxas_missing(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_row_candidates_compile_ahead_of_time_for_pruning():
    """What RowCase.static prunes with: a candidate's spec compiles for sm_80 at its own
    rows per program and warps (the default's spec is what aot_specs compiles)."""
    from hrm.ops.aot import compile_report
    from hrm.ops.impl import rms_norm
    from hrm.tuning.kernels import row_aot_spec
    from hrm.tuning.report import annotate

    b = RowBucket(1024, "bf16")
    spec = row_aot_spec(RMS_FWD, b, ROW_CFG, 80)
    assert spec.constexprs["BLOCK_ROWS"] == 2 and spec.num_warps == 2 and spec.constexprs["BLOCK_COLS"] == 1024
    default = row_aot_spec(RMS_FWD, b, default_row_config(RMS_FWD, b), 80)
    assert default == next(s for s in rms_norm.aot_specs(1024, torch.bfloat16) if s.name == default.name)
    (raw,) = compile_report([spec], (80,))
    assert annotate(raw, ARCHS["sm_80"])["problem"] is None
