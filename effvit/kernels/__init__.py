"""Hand-written kernels for the inference form: each module holds a kernel, its pure-PyTorch reference
with the same signature, and ``available(device)`` saying where the kernel runs."""
