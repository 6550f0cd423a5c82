"""Model names: one function reduces every accepted spelling; every entry point goes through it."""

from __future__ import annotations

import pytest

from effvit.models import create_model, parse_model_name, resolve_models, variant_name
from effvit.models.backbone import effvit_variant


@pytest.mark.parametrize("spelling", ["m0", "M0", " m0 ", "efficientvit_m0", "EfficientViT_M0",
                                      "effvit/efficientvit_m0", "timm/m0"])
def test_every_spelling_names_the_variant(spelling):
    assert variant_name(spelling) == "efficientvit_m0"


@pytest.mark.parametrize("name", ["m7", "efficientnet_lite0", "resnet50", ""])
def test_other_names_are_no_variant(name):
    assert variant_name(name) is None


def test_resolve_models_lists_and_refuses_unknown_names():
    assert resolve_models("all") == [f"efficientvit_m{i}" for i in range(6)]
    assert resolve_models("m4, EFFICIENTVIT_M1") == ["efficientvit_m4", "efficientvit_m1"]
    with pytest.raises(ValueError, match=r"unknown model 'm7'; choose from m0, m1, m2, m3, m4, m5$"):
        resolve_models("m0,m7")


def test_create_model_and_the_rotation_backbones_take_the_short_names():
    assert create_model("m0", img_size=64).variant == "efficientvit_m0"
    assert parse_model_name("timm/efficientvit_m2.r224_in1k") == ("efficientvit_m2", "r224_in1k")
    with pytest.raises(ValueError, match="unknown model 'm9'"):
        create_model("m9")
    assert effvit_variant("M3") == "efficientvit_m3"
    assert effvit_variant("timm/efficientvit_m3") is None  # timm's own implementation, by request
