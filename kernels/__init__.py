"""Triton kernels, one module per op (<op>_triton.py), installed as ``hmoe.kernels``.

Plain launchers only: registration, validation and autograd live in hmoe/ops/<op>.py. Importing
a module needs Triton; running it needs a GPU, or CPU tensors under TRITON_INTERPRET=1.
"""
