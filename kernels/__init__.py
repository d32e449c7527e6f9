"""Triton kernels of regap_fast, installed as ``regap_fast.kernels`` (see setup.py)."""
