import pytest
import torch

# Random BN statistics/affine and bias tables: the zero-init gammas would otherwise make every block an
# identity and hide most of the network from a parity check.
from effvit.fast.benchmark import randomise_norms as randomize  # noqa: F401


@pytest.fixture
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(123))
