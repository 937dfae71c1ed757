"""The benchmark runner's machinery and the parity CLI (not speed: that lives in benchmarks)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import __main__ as runner
from benchmarks import harness
from dlcore.testing import assert_parity, parity, poison_


def test_time_interleaved_reports_median_per_candidate():
    x = torch.randn(1000)
    times = harness.time_interleaved(
        {"a": lambda: x.sum(), "b": lambda: x.cumsum(0)},
        torch.device("cpu"),
        repeats=3,
        sample_seconds=0.001,
        budget_seconds=0.2,
    )
    assert set(times) == {"a", "b"}
    assert all(0 < t < 1 for t in times.values())


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # b takes 2x a in every round but the last (a noisy one), while the machine runs 3x slower
    # in rounds 3-4: the ratio of the two medians would be 6 / 1.1, the per-round ratios give 2.
    samples = {"a": [1.0, 1.0, 3.0, 3.0, 1.1], "b": [2.0, 2.0, 6.0, 6.0, 6.6]}
    assert harness.paired_ratio(samples, "b", "a") == 2.0
    assert harness.paired_ratio(samples, "a", "b") == 0.5
    with pytest.raises(ValueError):
        harness.paired_ratio({"a": [1.0], "b": [1.0, 2.0]}, "a", "b")


def test_fraction_of_limit_uses_bytes_or_flops():
    limits = {"copy_bandwidth": 10e9, "gemm_float32": 100e9}
    mem = harness.Case("f", "m", lambda d: {}, bytes_moved=5_000_000_000)
    assert harness.fraction_of_limit(mem, 1.0, limits) == (0.5, "copy bw")
    comp = harness.Case("f", "c", lambda d: {}, flops=25_000_000_000)
    assert harness.fraction_of_limit(comp, 1.0, limits) == (0.25, "gemm float32")


def _report(tmp_path):
    return {
        "device": "Test CPU (2 threads)",
        "device_type": "cpu",
        "date": "2026-11-25T12:00:00",
        "torch": torch.__version__,
        "quick": True,
        "limits": {"copy_bandwidth": 1e10},
        "results": [
            {
                "family": "demo",
                "case": "case one",
                "dtype": "torch.float32",
                "peer": "peerlib",
                "goal": ">= 3x peer",
                "times": {"dlcore": 1e-3, "eager": 4e-3, "peerlib": 3e-3},
                "speedup_vs_eager": 4.0,
                "speedup_vs_peer": 3.0,
                "fraction_of_limit": 0.5,
                "limit": "copy bw",
            },
            {"family": "demo", "case": "broken", "peer": "", "goal": "", "error": "boom"},
        ],
    }


def test_update_readme_regenerates_table_between_markers(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu-test-2026-11-25.json").write_text(json.dumps(_report(tmp_path)))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nstale row\n<!-- results:end -->\noutro\n")
    monkeypatch.setattr(runner, "RESULTS", str(results))
    monkeypatch.setattr(runner, "README", str(readme))
    runner.update_readme()
    text = readme.read_text()
    assert "stale row" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert (
        "| demo | case one | 1 ms | 4.00x | 3.00x (peerlib) | 50% copy bw |  | >= 3x peer |" in text
    )
    assert "| demo | broken | error: boom | | | | | |" in text


def test_update_readme_refuses_without_markers(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    monkeypatch.setattr(runner, "RESULTS", str(tmp_path))
    monkeypatch.setattr(runner, "README", str(readme))
    with pytest.raises(SystemExit, match="markers"):
        runner.update_readme()


def test_plot_family_writes_png(tmp_path):
    path = runner.plot_family(_report(tmp_path), "demo", str(tmp_path / "demo.png"))
    assert path and os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_parity_rule():
    ref64 = torch.linspace(-1, 1, 101, dtype=torch.float64)
    ref32 = ref64.float()
    assert parity(ref32, ref64, ref32).passed
    off = ref32.clone()
    off[3] += 1e-3
    assert not parity(off, ref64, ref32).passed
    poisoned = poison_(torch.empty(101))
    with pytest.raises(AssertionError, match="101 non-finite"):
        assert_parity(poisoned, ref64, ref32)


def test_check_cli_runs_and_reports():
    proc = subprocess.run(
        [sys.executable, "-m", "dlcore", "check", "--backend", "eager"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed, 0 failed" in proc.stdout


def test_check_cli_usage():
    proc = subprocess.run([sys.executable, "-m", "dlcore"], capture_output=True, text=True)
    assert proc.returncode != 0 and "usage: python -m dlcore check" in proc.stderr
