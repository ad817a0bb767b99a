"""Triton kernels (installed as fastcgan.kernels). Import a kernel module only when used."""
