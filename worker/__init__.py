"""The pto chip worker: maps tensors, runs kernels, reports results (python -m worker)."""
