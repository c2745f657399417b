"""Benchmarks: one run on one machine measures every runtime x precision path of a model against its
baselines (torch eager fp32, the SD-2.1-base architecture at 1 and 25 steps with classifier-free
guidance, OpenVINO fp32 / NNCF int8) and writes JSON, a markdown table and a chart.

    python -m benchmarks.bench sdxs-512 --resolution 512 --runs 3

Nothing here imports PyTorch or a backend at import time: each measurement runs in its own worker
process (`benchmarks.worker`), so its peak resident memory is its own.
"""
