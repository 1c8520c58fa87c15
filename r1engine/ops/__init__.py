"""Fused operators with a backend switch (torch reference, C++ CPU, Triton, CUDA)."""
