"""Backend registry, forcing and the extension-missing path."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dlcore
from dlcore.backends import select
from dlcore.ops.common import register_autograd


def test_backends_lists_every_backend_with_reason():
    status = dlcore.backends()
    assert list(status) == ["triton", "cuda", "cpu", "eager"]
    assert status["eager"].available
    assert all(s.detail for s in status.values())
    if not torch.cuda.is_available():
        assert not status["cuda"].available
        assert "CPU-only" in status["cuda"].detail or "no CUDA device" in status["cuda"].detail
        assert status["triton"].available and "interpreter" in status["triton"].detail


def test_cpu_extension_is_built_here():
    # CI builds the extension; a silent fallback to eager would hide a broken build.
    assert dlcore.backends()["cpu"].available, dlcore.backends()["cpu"].detail


def test_default_selection_by_device():
    assert select("dlcore::x", torch.device("cpu"), ("triton", "cpu", "eager")) == "cpu"
    assert select("dlcore::x", torch.device("cpu"), ("triton", "eager")) == "eager"


def test_context_manager_forces_and_restores():
    with dlcore.backend("eager"):
        assert select("dlcore::x", torch.device("cpu"), ("cpu", "eager")) == "eager"
        with dlcore.backend(None):
            assert select("dlcore::x", torch.device("cpu"), ("cpu", "eager")) == "cpu"
    assert select("dlcore::x", torch.device("cpu"), ("cpu", "eager")) == "cpu"


def test_bad_backend_name():
    with pytest.raises(ValueError, match=r"unknown dlcore backend 'cudnn'.*expected one of"):
        with dlcore.backend("cudnn"):
            pass


def test_bad_backend_name_from_env(monkeypatch):
    monkeypatch.setenv("DLCORE_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"'fast' \(from DLCORE_BACKEND\)"):
        select("dlcore::x", torch.device("cpu"), ("cpu", "eager"))


def test_env_forces_backend(monkeypatch):
    monkeypatch.setenv("DLCORE_BACKEND", "eager")
    assert select("dlcore::x", torch.device("cpu"), ("cpu", "eager")) == "eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_forced_unavailable_backend_raises_with_reason():
    with dlcore.backend("cuda"):
        with pytest.raises(RuntimeError, match=r"'cuda' is forced but cannot run dlcore::x: .*"):
            select("dlcore::x", torch.device("cpu"), ("cuda", "eager"))


def test_forced_backend_not_implemented_by_op():
    with dlcore.backend("cuda"):
        with pytest.raises(RuntimeError, match=r"does not implement dlcore::x \(implemented: cpu"):
            select("dlcore::x", torch.device("cpu"), ("cpu", "eager"))


def test_forced_cpu_backend_rejects_cuda_tensors():
    with dlcore.backend("cpu"):
        with pytest.raises(RuntimeError, match="takes CPU tensors, got cuda tensors"):
            select("dlcore::x", torch.device("cuda"), ("cpu", "eager"))


def test_missing_extension_is_reported(tmp_path):
    # Block dlcore._C as if it had never been built: dlcore must still import, report why the
    # cpu backend is unavailable, and refuse a forced cpu backend with that reason.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["dlcore._C"] = None
        import torch, dlcore
        s = dlcore.backends()
        assert not s["cpu"].available, s["cpu"]
        print(s["cpu"].detail)
        assert s["eager"].available
        from dlcore.backends import select
        with dlcore.backend("cpu"):
            try:
                select("dlcore::x", torch.device("cpu"), ("cpu", "eager"))
            except RuntimeError as e:
                print("RAISED", e)
        print("DEFAULT", select("dlcore::x", torch.device("cpu"), ("cpu", "eager")))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ)
    )
    assert out.returncode == 0, out.stderr
    assert "dlcore._C is not built or failed to load" in out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout
    assert "RAISED dlcore backend 'cpu' is forced but cannot run dlcore::x" in out.stdout
    assert "DEFAULT eager" in out.stdout


@torch.library.custom_op("dlcore_test::probe", mutates_args=())
def _probe(x: torch.Tensor) -> torch.Tensor:
    _SEEN.append(("forward", select("dlcore_test::probe", x.device, ("cpu", "eager"))))
    return x.clone()


@_probe.register_fake
def _(x):
    return torch.empty_like(x)


def _probe_setup(ctx, inputs, output):
    pass


def _probe_backward(ctx, grad):
    _SEEN.append(("backward", select("dlcore_test::probe", grad.device, ("cpu", "eager"))))
    return grad


_SEEN: list = []
register_autograd(_probe, _probe_backward, setup_context=_probe_setup)


def test_backward_runs_on_the_backend_forced_for_the_forward():
    # Autograd runs backward after the `with` block has exited; the gradient must still come
    # from the backend that produced the output.
    _SEEN.clear()
    x = torch.randn(3, requires_grad=True)
    with dlcore.backend("eager"):
        y = _probe(x)
    y.sum().backward()
    assert _SEEN == [("forward", "eager"), ("backward", "eager")]
    _SEEN.clear()
    _probe(x).sum().backward()
    assert _SEEN == [("forward", "cpu"), ("backward", "cpu")]
