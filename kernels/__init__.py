"""Triton kernels and their launchers, installed as ``dlcore.kernels``.

Each family module (``kernels/<family>.py``) holds its @triton.jit kernels, the launchers the ops
call, and ``AOT_SPECS``: every (kernel, signature, constexprs, config) it can launch with, which
``python -m dlcore.kernels.aot`` compiles ahead of time for sm_80 and sm_90.
"""
