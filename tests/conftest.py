import os

import pytest
import torch

# Without a GPU, Triton kernels run on Triton's CPU interpreter. The flag is read when a kernel is defined,
# at its module's import, so it is set here, before anything imports effvit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Random BN statistics/affine and bias tables: the zero-init gammas would otherwise make every block an
# identity and hide most of the network from a parity check.
from effvit.bench.weights import randomise_norms as randomize  # noqa: E402, F401


@pytest.fixture
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A saved 4-class M0 at 32 px with realistic norms: what predict-side tests load."""
    from effvit.models import create_model
    from effvit.models.weights import save_checkpoint

    torch.manual_seed(0)
    model = randomize(create_model("efficientvit_m0", num_classes=4, img_size=32)).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "m0.pth")
