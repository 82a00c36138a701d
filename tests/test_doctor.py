"""``hrm doctor``: the host-read counter, the cheap sections in-process, bad input, and one
end-to-end ``hrm doctor --quick`` (slow). Nothing here needs the host-read check itself to
pass: the train step still reads its packing on the host (another change removes that)."""

from __future__ import annotations

import json

import pytest
import torch

from hrm.bench import suites
from hrm.cli import main
from hrm.doctor import CUDA_ONLY, SECTIONS, checks, count_host_reads
from hrm.doctor.run import SectionProcess, run_doctor, run_section_process, run_section_processes
from hrm.errors import HrmError
from hrm.ops import dispatch


# -- count_host_reads ------------------------------------------------------------------------
def test_count_host_reads_counts_item_bool_int_and_tolist():
    t = torch.tensor([1.5, -2.0, 3.0])
    before = torch.Tensor.tolist
    with count_host_reads() as reads:
        t[0].item()
        bool(t[1] > 0)
        int(t[2])
        t.tolist()
    assert (reads.local_scalar_dense, reads.tolist, reads.total) == (3, 1, 4)
    assert sum(reads.sites.values()) == 4 and all(__file__ in site for site in reads.sites)
    assert torch.Tensor.tolist is before


def test_count_host_reads_is_zero_for_tensor_ops_and_restores_tolist_after_an_error():
    t = torch.randn(4, 3, requires_grad=True)
    before = torch.Tensor.tolist
    with count_host_reads() as reads:
        y = (t.sin() @ t.T).softmax(-1).sum()
        y.backward()
        torch.where(t > 0, t, 0).cumsum(0)
    assert reads.total == 0
    with pytest.raises(RuntimeError), count_host_reads():
        raise RuntimeError("boom")
    assert torch.Tensor.tolist is before
    assert t.tolist() == t.detach().numpy().tolist()


@torch.library.custom_op("hrm_test::reads_inside", mutates_args=())
def _reads_inside(x: torch.Tensor) -> torch.Tensor:
    if bool(x.sum() > 0):  # a host read inside a custom op's body
        return x * 2
    return x * 3


_reads_inside.register_autograd(lambda ctx, g: g * float(g.abs().max()))  # and one in its backward


def test_count_host_reads_sees_inside_custom_ops():
    """A custom op's body runs below autograd; its reads count too (forward and backward)."""
    x = torch.ones(3, requires_grad=True)
    with count_host_reads() as reads:
        _reads_inside(x).sum().backward()
    assert reads.local_scalar_dense == 2 and reads.tolist == 0


# -- sections in-process ---------------------------------------------------------------------
def test_device_section_lists_every_backend_with_a_reason():
    result = checks.device_section(torch.device("cpu"))
    assert {"name", "torch", "python", "triton", "git_commit", "memory_gib"} <= set(result["info"])
    rows = {b["backend"]: b for b in result["backends"]}
    assert list(rows) == list(dispatch.BACKENDS)
    assert rows["torch"]["available"] and rows["torch"]["checked"] == "native"
    for b in rows.values():
        assert b["available"] == (b["reason"] is None)
    assert rows["cuda"]["checked"] is None or torch.cuda.is_available()  # needs a GPU and libhrm_cuda


def test_parity_section_checks_every_op_of_the_torch_backend():
    rows = checks.parity_section("torch", torch.device("cpu"), quick=True)
    ops_checked = {r["op"] for r in rows}
    assert ops_checked == {op for op in dispatch.registered_ops() if "torch" in dispatch.implementations(op)}
    assert all(r["status"] == checks.PASS and r["error"] <= r["tolerance"] for r in rows), rows
    degenerate = [r for r in rows if r["op"] == "prefixlm_attention" and "prefix = length" in r["shape"]]
    assert degenerate and degenerate[0]["dtype"] == "float32"


def test_op_parity_runs_in_the_given_dtype():
    case = checks.attention_case([1, 6, 3], [1, 6, 2], 2, 2, 16, torch.device("cpu"), "tiny")
    inputs = case.inputs()
    fp32, bf16 = (suites.op_parity(case, inputs, "torch", dtype) for dtype in (torch.float32, torch.bfloat16))
    assert fp32 < 1e-5 and 1e-3 < bf16 < 5e-2


def test_cuda_kernel_cases_are_the_bench_cases_in_their_dtypes():
    """The cuda_kernels section times the bench's own cases: the transition in fp32 and bf16
    (its bytes in that dtype's elements), the SwiGLU GEMM in bf16, the one dtype its kernel takes."""
    got = checks.cuda_kernel_cases(checks.QUICK_OPS, torch.device("cpu"))
    assert [(c.name, dtype, unit) for c, dtype, unit in got] == [
        ("magicnorm_transition", torch.float32, "GB/s"),
        ("magicnorm_transition", torch.bfloat16, "GB/s"),
        ("swiglu_linear", torch.bfloat16, "TFLOP/s"),
    ]
    assert got[0][0].fwd_bytes == 2 * got[1][0].fwd_bytes
    cfg, T = checks.QUICK_OPS.model, checks.QUICK_OPS.tokens
    assert got[2][0].fwd_flops == 2 * T * cfg.hidden_size * 2 * cfg.intermediate_size


@pytest.mark.parametrize("section", CUDA_ONLY)
def test_cuda_only_sections_skip_on_cpu_with_a_reason(section):
    rows = checks.run_section({"section": section, "device": "cpu", "quick": True, "backends": None})
    assert rows and all(r["status"] == checks.SKIP and r["note"] == checks.NEEDS_CUDA for r in rows)


def test_a_section_on_cuda_sets_the_device_by_its_index(monkeypatch):
    """``--device cuda`` (the default on a GPU) reaches the section as a bare ``cuda``, which
    ``torch.cuda.set_device`` refuses (every section of the first H200 run failed so): the
    section names the current device's index first, and its checks get that device."""
    import torch._utils

    set_to = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_to.append(torch._utils._get_device_index(d)))
    monkeypatch.setattr(checks, "device_section", lambda device: {"device": str(device)})
    assert checks.run_section({"section": "device", "device": "cuda", "quick": True}) == {"device": "cuda:0"}
    assert set_to == [0]


def test_sections_run_at_once_and_one_that_crashes_or_hangs_is_reported_not_raised():
    spec = {"section": "device", "device": "cpu", "quick": True, "backends": None}
    ok, crashed = run_section_processes(
        [
            SectionProcess(spec, "device", timeout=120),
            SectionProcess({**spec, "section": "bogus"}, "crash", timeout=120),
        ]
    )
    assert ok.error is None and [b["backend"] for b in ok.result["backends"]] == list(dispatch.BACKENDS)
    assert crashed.result is None and crashed.error.startswith("exit code 1: KeyError")
    hung = run_section_process(spec, "hang", timeout=0.01)
    assert hung.result is None and hung.error == "timed out after 0 s"


def test_bad_input_is_an_error_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(HrmError, match="unknown backend"):
        run_doctor(backends=["nope"], out=tmp_path)
    assert main(["doctor", "--sections", "bogus", "--out", str(tmp_path)]) == 2
    assert "unknown section bogus" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["doctor", "--device", "cuda", "--out", str(tmp_path)]) == 2


def test_section_timeout_caps_every_section_and_the_report_names_them(tmp_path):
    report, paths = run_doctor(device="cpu", sections=["host_reads"], section_timeout=0.01, out=tmp_path)
    assert [r["error"] for r in report["sections"]] == ["timed out after 0 s"] * 2  # device, host_reads
    assert report["settings"]["complete"] and not report["passed"]
    assert report["failures"] == [
        "device: did not finish: timed out after 0 s",
        "host_reads: did not finish: timed out after 0 s",
    ]
    assert json.loads(paths["json"].read_text()) == report
    with pytest.raises(HrmError, match="positive number of seconds"):
        run_doctor(device="cpu", section_timeout=0, out=tmp_path)


def test_an_interrupted_run_leaves_the_report_of_the_sections_that_finished(tmp_path, monkeypatch):
    import hrm.doctor.run as run_module

    real, calls = run_module.run_section_processes, []

    def interrupt_after_the_first(processes):
        calls.append(processes)
        if len(calls) > 1:
            for p in processes:
                p.kill()
            raise KeyboardInterrupt
        return real(processes)

    monkeypatch.setattr(run_module, "run_section_processes", interrupt_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        run_doctor(device="cpu", sections=["host_reads"], out=tmp_path)
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert [r["section"] for r in report["sections"]] == ["device"] and report["sections"][0]["error"] is None
    assert not report["settings"]["complete"] and not report["passed"]
    assert report["failures"] == ["not run (interrupted): host_reads"]
    assert "interrupted: partial report" in (tmp_path / "doctor.md").read_text()


# -- end to end ------------------------------------------------------------------------------
@pytest.mark.slow
def test_doctor_quick_end_to_end(tmp_path, capsys):
    code = main(["doctor", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "doctor.json").read_text())
    md = (tmp_path / "doctor.md").read_text()
    assert md in out
    assert code == 0 and report["passed"] and not report["failures"], report["failures"]
    runs = report["sections"]
    assert all(r["error"] is None for r in runs), [r["error"] for r in runs]
    rows = {s: [row for r in runs if r["section"] == s for row in r["result"]] for s in SECTIONS[1:]}

    # every backend is listed; every op of every checked backend has parity rows, all passing
    assert [b["backend"] for b in report["backends"]] == list(dispatch.BACKENDS)
    for b in report["backends"]:
        assert f"| {b['backend']} |" in md
        if b["checked"]:
            implemented = {op for op in dispatch.registered_ops() if b["backend"] in dispatch.implementations(op)}
            assert {r["op"] for r in rows["parity"] if r["backend"] == b["backend"]} == implemented
    assert rows["parity"] and all(r["status"] == checks.PASS for r in rows["parity"]), [
        r for r in rows["parity"] if r["status"] != checks.PASS
    ]
    assert {r["dtype"] for r in rows["parity"]} >= {"float32", "bfloat16"}

    # the train step ran and read nothing back to the host
    reads = next(r for r in rows["host_reads"] if r["check"].startswith("host reads"))
    assert reads["status"] == checks.PASS and reads["value"] == 0

    # attention timing: ours and SDPA timed forward and forward+backward
    timed = [r for r in rows["attention_timing"] if "rate" in r]
    assert {r["mode"] for r in timed} == {"forward", "forward+backward"}
    assert any(r["impl"].startswith("torch SDPA") for r in timed) and any(r["impl"].startswith("hrm") for r in timed)
    assert all(r["rate"] > 0 for r in timed)

    if not torch.cuda.is_available():  # the GPU-only parts say why they were skipped
        gpu_only = (
            rows["long_attention"]
            + rows["cuda_graph"]
            + [
                r
                for r in rows["host_reads"] + rows["attention_timing"]
                if "CUDA" in r["check"] or "flash" in r["check"]
            ]
        )
        assert len(gpu_only) >= 5 and all(
            r["status"] == checks.SKIP and r["note"] == checks.NEEDS_CUDA for r in gpu_only
        )
        assert "needs a CUDA device" in md
