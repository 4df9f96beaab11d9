"""Shared test settings."""

import os

import torch

# Small tensors on a 2-core machine run far faster on one thread: two OpenMP threads spin against
# each other (and against notebook kernels the tests start) and make tiny ops 10x slower.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
