"""``python -m effvit.kernels.cpu``: build effvit's OpenVINO extension now (``make kernels`` runs it). Exits 0
either way: without a compiler the rest of effvit works and exports use the standard graphs; the one-line
notice says why."""

from . import KernelUnavailable, extension_path

try:
    print(f"effvit OpenVINO extension: {extension_path()}")
except KernelUnavailable as e:
    print(f"effvit OpenVINO extension not built ({str(e).splitlines()[0]}); the standard graphs are used")
