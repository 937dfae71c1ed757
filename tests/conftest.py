"""Shared test setup: Triton interpreter on CPU-only machines, markers, backend lists."""

import os

import torch

# Triton picks interpreter vs compiled mode when a kernel is decorated, so this must run before
# anything imports dlcore.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dlcore  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def backends_for(device: str, implemented=("triton", "cuda", "cpu", "eager")) -> list:
    """pytest params for every implemented backend that can run on ``device`` here; backends that
    cannot run are listed as skips that say why, so the report shows what was not covered."""
    status = dlcore.backends()
    params = []
    for name in implemented:
        why = None
        if not status[name].available:
            why = status[name].detail
        elif name == "cpu" and device != "cpu":
            why = "cpu backend takes CPU tensors"
        elif name == "cuda" and device != "cuda":
            why = "cuda backend takes CUDA tensors"
        elif name == "triton" and device == "cpu" and HAS_CUDA:
            why = "triton runs on CPU tensors only in interpreter mode"
        marks = [pytest.mark.skip(reason=f"{name}: {why}")] if why else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


DEVICE = "cuda" if HAS_CUDA else "cpu"
