"""csrc/cuda/*.cu compile with nvcc for sm_80 and sm_90a (compile only; nothing runs here)."""

import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda holds no .cu file"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", SOURCES, ids=[os.path.basename(s) for s in SOURCES])
def test_nvcc_compiles(source, tmp_path, capsys):
    cmd = [
        NVCC, "-c", "-std=c++17", "-O3", "-Xptxas", "-v", "-I", os.path.join(ROOT, "csrc"),
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
        source, "-o", str(tmp_path / "out.o"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = [ln for ln in proc.stderr.splitlines() if "ptxas info" in ln]
    with capsys.disabled():
        print(f"\nnvcc {os.path.basename(source)}:")
        for ln in report:
            if "Compiling entry" in ln or "Used" in ln or "spill" in ln:
                print("  " + ln.split("ptxas info    : ")[-1])
    assert report, "ptxas reported nothing: no kernel was compiled"
    spills = [ln for ln in report if re.search(r"[1-9]\d* bytes spill (stores|loads)", ln)]
    assert not spills, "\n".join(spills)
