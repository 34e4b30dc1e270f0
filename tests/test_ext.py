"""The extension loader's diagnoses and the `e2evlp info` command."""

import json
import subprocess
import sys

import pytest
import torch

from e2evlp import _ext, cli


def test_extension_is_built_and_records_its_build():
    info = _ext.build_info()
    assert info["built"], info.get("reason")
    assert info["torch"] == torch.__version__
    assert isinstance(info["with_cuda"], bool)
    recorded = _ext.recorded_build()
    assert recorded is not None and recorded["torch"] == torch.__version__
    assert recorded["with_cuda"] == info["with_cuda"]
    if info["with_cuda"]:
        assert info["archs"] and recorded["cuda_archs"] == info["cuda_archs"]


def test_missing_build_is_explained(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fail_on_ext(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "e2evlp" and fromlist and "_C" in fromlist:
            raise ImportError("undefined symbol: _ZN3c104cuda9SomethingE")
        return real_import(name, globals, locals, fromlist, level)

    _ext._load.cache_clear()
    monkeypatch.setattr(builtins, "__import__", fail_on_ext)
    monkeypatch.setattr(_ext, "recorded_build", lambda: {"torch": "2.0.0"})
    try:
        expected = r"built against torch 2\.0\.0 but torch .* is installed; rebuild"
        with pytest.raises(_ext.ExtensionError, match=expected):
            _ext.require()
        _ext._load.cache_clear()
        monkeypatch.setattr(_ext, "recorded_build", lambda: None)
        assert "is not built" in _ext.unavailable_reason()
    finally:
        monkeypatch.undo()
        _ext._load.cache_clear()
    assert _ext.available()


def test_cuda_request_on_cpu_only_build_is_explained(monkeypatch):
    module = _ext.require()
    if module.build_info()["with_cuda"]:
        pytest.skip("this build has CUDA kernels")
    with pytest.raises(_ext.ExtensionError, match="without its CUDA kernels"):
        _ext.require("cuda")


@pytest.mark.parametrize(
    ("archs", "capability", "expected"),
    [
        ("8.0;9.0", (9, 0), True),
        ("8.0;9.0", (8, 6), True),  # an sm_80 cubin runs on later minors of 8
        ("8.0;9.0", (7, 5), False),
        ("8.0;9.0", (10, 0), False),  # no cubin runs across majors
        ("8.0;9.0+PTX", (10, 0), True),  # the PTX is compiled for it when loaded
        ("8.0;9.0+PTX", (12, 0), True),
        ("9.0+PTX", (8, 0), False),  # PTX runs on later GPUs only
        ("9.0a", (9, 0), True),
        ("8.0 8.6", (8, 9), True),
        ("", (9, 0), False),
        ("8.0;Hopper", (7, 0), None),  # a named architecture: unknown, so not refused
    ],
)
def test_which_builds_run_on_which_gpus(archs, capability, expected):
    assert _ext.runs_on(archs, capability) is expected


def test_cuda_request_for_an_uncovered_gpu_is_explained(monkeypatch):
    class Built:
        def build_info(self):
            return {"with_cuda": True, "cuda_archs": "8.0;9.0"}

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (10, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA B200")
    expected = r"TORCH_CUDA_ARCH_LIST='8\.0;9\.0' only, none of which runs on NVIDIA B200 \(compute capability 10\.0\)"
    with pytest.raises(_ext.ExtensionError, match=expected):
        _ext._check_arch(Built(), 0)


def test_info_command(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "triton", "e2evlp._C", "GPU", "attention"):
        assert key in out
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["extension"]["built"] and info["torch"] == torch.__version__
    assert info["attention_backend"]["cpu"] in ("sdpa", "triton", "reference")


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "e2evlp", "info", "--json"], capture_output=True, text=True,
                            check=True)
    assert json.loads(result.stdout)["python"]


def test_attention_backend_override(monkeypatch):
    from e2evlp.ops import attention_backend

    monkeypatch.setenv("E2EVLP_ATTENTION", "reference")
    assert attention_backend("cpu") == "reference"
    monkeypatch.setenv("E2EVLP_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="E2EVLP_ATTENTION"):
        attention_backend("cpu")


def test_bench_command_runs_a_quick_benchmark(tmp_path):
    run = tmp_path / "run.json"
    assert cli.main(["bench", "lsap", "--device", "cpu", "--quick", "--out", str(tmp_path), "--json", str(run)]) == 0
    records = json.loads(run.read_text())["records"]
    assert list(tmp_path.glob("*-quick.json")), "the results folder gets its per-device, per-date file"
    assert {r["impl"] for r in records} >= {"e2evlp", "scipy-loop"}
    assert all(r["bench"] == "lsap" and r["ms"] > 0 for r in records)
