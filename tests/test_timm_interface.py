"""timm's model interface on effvit's models: code written for timm's efficientvit_m* keeps working."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import randomize
from timm.data import create_transform, resolve_data_config, resolve_model_data_config
from timm.optim import param_groups_layer_decay
from torchvision.models.feature_extraction import create_feature_extractor

import effvit
from effvit.models.weights import FORMAT_TAG


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_timm_transforms_from_our_model_equal_those_from_timms():
    ours = effvit.create_model("efficientvit_m0")
    ref = timm.create_model("efficientvit_m0", pretrained=False)
    assert resolve_data_config(model=ours) == resolve_data_config(model=ref)
    assert resolve_model_data_config(ours) == resolve_model_data_config(ref)
    for training in (False, True):
        assert repr(create_transform(**resolve_data_config(model=ours), is_training=training)) == \
            repr(create_transform(**resolve_data_config(model=ref), is_training=training))


def test_data_config_follows_the_model_as_built():
    """timm's config stays at 3x224x224 for a 64 px grey model; ours describes the model."""
    cfg = resolve_data_config(model=effvit.create_model("efficientvit_m0", img_size=64, in_chans=1,
                                                        num_classes=10))
    assert cfg["input_size"] == (1, 64, 64) and len(cfg["mean"]) == len(cfg["std"]) == 1
    tf = create_transform(**cfg)
    from PIL import Image

    assert tf(Image.new("L", (100, 80))).shape == (1, 64, 64)


def test_pretrained_cfg_has_timms_keys():
    cfg = effvit.create_model("efficientvit_m3").pretrained_cfg
    ref = timm.create_model("efficientvit_m3").pretrained_cfg
    for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes",
                "first_conv", "classifier", "pool_size", "tag", "license", "hf_hub_id"):
        assert cfg[key] == ref[key], key
    assert ref["fixed_input_size"] and not cfg["fixed_input_size"]  # ours runs at any resolution
    assert cfg["url"].endswith("efficientvit_m3.pth") and cfg["architecture"] == "efficientvit_m3"
    assert effvit.create_model("efficientvit_m3").default_cfg == cfg


def test_names_tags_and_list_models():
    assert effvit.list_models(pretrained=True) == [f"efficientvit_m{i}.r224_in1k" for i in range(6)]
    assert effvit.list_models("*m2", pretrained=True) == ["efficientvit_m2.r224_in1k"]
    for name in ("m0", "efficientvit_m0", "efficientvit_m0.r224_in1k", "timm/efficientvit_m0.r224_in1k",
                 "hf-hub:timm/efficientvit_m0.r224_in1k"):
        assert effvit.create_model(name).variant == "efficientvit_m0"
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        effvit.create_model("efficientvit_m0.in22k")


@pytest.mark.slow
def test_create_model_takes_timms_arguments(tmp_path):
    torch.manual_seed(0)
    src = randomize(effvit.create_model("efficientvit_m0"))
    path = effvit.save_checkpoint(src, tmp_path / "m0.safetensors")
    x = _x(2, 3, 224, 224)
    with torch.no_grad():
        ref = src.eval()(x)
        # pretrained=True reads the config's file, which the overlay points at a local copy
        m = effvit.create_model("m0", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                scriptable=True, exportable=True, no_jit=True)
        torch.testing.assert_close(m.eval()(x), ref, rtol=0, atol=0)
        m = effvit.create_model("m0", checkpoint_path=path)
        torch.testing.assert_close(m.eval()(x), ref, rtol=0, atol=0)
        m = effvit.create_model("m0", drop_rate=0.3, global_pool="max", device="cpu", dtype=torch.float64)
        assert m.head.drop.p == 0.3 and m.global_pool.pool_type == "max"
        assert all(p.dtype == torch.float64 for p in m.parameters())
        assert m.eval()(x.double()).dtype == torch.float64


@pytest.mark.slow
def test_features_only_feature_info_config_and_feature_cls(tmp_path):
    torch.manual_seed(0)
    model = randomize(effvit.create_model("efficientvit_m1")).eval()
    path = effvit.save_checkpoint(model, tmp_path / "m1.pth")
    feats = effvit.create_model("efficientvit_m1", features_only=True, out_indices=(0, 2), pretrained=path).eval()
    assert feats.feature_info.channels() == [128, 192] and feats.feature_info.reduction() == [16, 64]
    assert feats.pretrained_cfg["architecture"] == "efficientvit_m1"
    x = _x(2, 3, 224, 224)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=(0, 2), intermediates_only=True)
        got = feats(x)
        getter = effvit.create_model("efficientvit_m1", features_only=True, out_indices=(0, 2),
                                     feature_cls="getter", pretrained=path).eval()
        for a, b, c in zip(got, getter(x), want, strict=True):
            torch.testing.assert_close(a, c, rtol=0, atol=0)
            torch.testing.assert_close(b, c, rtol=0, atol=0)
    feats.set_grad_checkpointing(True)
    feats.train()
    sum(f.sum() for f in feats(x)).backward()


@torch.no_grad()
def test_forward_intermediates_shapes_values_and_pruning():
    torch.manual_seed(0)
    model = randomize(effvit.create_model("efficientvit_m2", img_size=(320, 192))).eval()
    x = _x(2, 3, 320, 192)
    stem = model.patch_embed(x)
    s0 = model.stages[0](stem)
    s1 = model.stages[1](s0)
    s2 = model.stages[2](s1)
    final, inter = model.forward_intermediates(x)
    assert [tuple(t.shape) for t in inter] == [(2, 128, 20, 12), (2, 192, 10, 6), (2, 224, 5, 3)]
    for a, b in zip(inter, (s0, s1, s2), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
    assert [tuple(t.shape) for t in model.forward_intermediates(x, indices=1, intermediates_only=True)] == \
        [(2, 224, 5, 3)]
    logits = model(x)
    kept = model.prune_intermediate_layers(indices=[1], prune_head=True)
    assert kept == [1] and len(model.stages) == 2 and model.num_classes == 0
    torch.testing.assert_close(model.forward_intermediates(x, indices=[1], intermediates_only=True)[0], s1)
    assert logits.shape == (2, 1000)


@pytest.mark.slow
@torch.no_grad()
def test_fx_feature_extraction_equals_the_stage_outputs():
    torch.manual_seed(0)
    model = randomize(effvit.create_model("efficientvit_m0")).eval()
    x = _x(2, 3, 224, 224)
    fx = create_feature_extractor(model, return_nodes={"stages.0": "s0", "stages.1": "s1", "stages.2": "s2",
                                                       "head": "logits"})
    out = fx(x)
    want = model.forward_intermediates(x, intermediates_only=True)
    for key, ref in zip(("s0", "s1", "s2"), want, strict=True):
        torch.testing.assert_close(out[key], ref, rtol=0, atol=0)
    torch.testing.assert_close(out["logits"], model(x), rtol=0, atol=0)
    scripted = torch.jit.script(torch.fx.symbolic_trace(model))  # timm's FX + TorchScript path
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-6)


@torch.no_grad()
def test_checkpoint_filter_fn_and_set_input_size_as_timm_uses_them():
    """timm's pretrained load at another size goes through the module's checkpoint_filter_fn."""
    from effvit.models.weights import checkpoint_filter_fn

    torch.manual_seed(0)
    model = randomize(effvit.create_model("efficientvit_m0", num_classes=5)).eval()
    at_256 = effvit.create_model("efficientvit_m0", num_classes=5, img_size=256).eval()
    at_256.load_state_dict(checkpoint_filter_fn(model.state_dict(), at_256))
    model.set_input_size(img_size=(256, 256))
    model.set_input_size()  # None keeps the size
    x = _x(1, 3, 256, 256)
    torch.testing.assert_close(model(x), at_256(x), rtol=0, atol=0)
    attn = model.stages[0].blocks[0].mixer.m.attn
    torch.testing.assert_close(attn.get_attention_biases(x.device), attn.attention_biases[:, attn.attention_bias_idxs])


def test_classifier_interface_and_layer_decay():
    model = effvit.create_model("efficientvit_m4")
    assert model.get_classifier() is model.head.linear and isinstance(model.get_classifier(), torch.nn.Linear)
    assert model.num_features == model.head_hidden_size == 384
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) >= 4 and max(scales) == 1.0  # stem < stages < head
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_reset_classifier_keeps_dtype_device_and_mode(mode):
    model = effvit.create_model("efficientvit_m0", dtype=torch.float64)
    model.train(mode == "train")
    model.reset_classifier(7)
    head = model.get_classifier()
    assert head.weight.dtype == torch.float64 and head.weight.device.type == "cpu"
    assert model.head.training == (mode == "train") and model.training == (mode == "train")
    model.reset_classifier(0, global_pool="max")
    assert model.global_pool.pool_type == "max"
    assert model.eval()(_x(1, 3, 224, 224).double()).shape == (1, 384 // 2)


@torch.no_grad()
def test_set_input_size_equals_building_at_that_size():
    torch.manual_seed(0)
    model = randomize(effvit.create_model("efficientvit_m0")).eval()
    sd = model.state_dict()
    model.set_input_size((320, 192))
    built = effvit.create_model("efficientvit_m0", img_size=(320, 192)).eval()
    built.load_state_dict(effvit.models.weights.fit_state_dict(built, sd), strict=False)
    x = _x(1, 3, 320, 192)
    torch.testing.assert_close(model(x), built(x), rtol=0, atol=0)
    assert model.img_size == (320, 192) and model.pretrained_cfg["input_size"] == (3, 320, 192)


@torch.no_grad()
def test_headless_model_loads_a_checkpoint_dropping_the_head(tmp_path):
    torch.manual_seed(0)
    src = randomize(effvit.create_model("efficientvit_m0")).eval()
    path = effvit.save_checkpoint(src, tmp_path / "m0.pth")
    headless = effvit.create_model("efficientvit_m0", pretrained=path, num_classes=0).eval()
    x = _x(2, 3, 224, 224)
    torch.testing.assert_close(headless(x), src.forward_head(src.forward_features(x), pre_logits=True))


@torch.no_grad()
def test_pth_and_safetensors_of_a_64px_grey_model_rebuild_identically(tmp_path):
    torch.manual_seed(0)
    src = randomize(effvit.create_model("efficientvit_m0", num_classes=10, in_chans=1, img_size=64)).eval()
    src.pretrained_cfg["label_names"] = tuple(f"c{i}" for i in range(10))
    x = _x(3, 1, 64, 64)
    ref = src(x)
    loaded = [effvit.load_model(effvit.save_checkpoint(src, tmp_path / f"grey{s}")) for s in (".pth", ".safetensors")]
    for m in loaded:
        assert (m.num_classes, m.in_chans, m.img_size) == (10, 1, (64, 64))
        assert m.pretrained_cfg["label_names"] == tuple(f"c{i}" for i in range(10))
        assert m.pretrained_cfg["input_size"] == (1, 64, 64)
        # bias tables at the saved size, not resized to 224 and back
        assert m.stages[2].blocks[0].mixer.m.attn.attention_biases.shape == (4, 1)
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    assert resolve_data_config(model=loaded[0]) == resolve_data_config(model=loaded[1])


@pytest.mark.slow
@torch.no_grad()
def test_load_model_reads_training_checkpoints_with_and_without_ema(tmp_path):
    torch.manual_seed(0)
    model = randomize(effvit.create_model("efficientvit_m0", num_classes=3, img_size=64))
    ema = randomize(effvit.create_model("efficientvit_m0", num_classes=3, img_size=64), seed=5)
    path = tmp_path / "last.pth"
    torch.save({"format": FORMAT_TAG, "state_dict": model.state_dict(), "ema": ema.state_dict(),
                "meta": {"arch": "efficientvit_m0", "img_size": [64, 64], "class_names": ["a", "b", "c"],
                         "dataset": "folder"}, "epoch": 3}, path)
    x = _x(2, 3, 64, 64)
    got = effvit.load_model(path)
    torch.testing.assert_close(got(x), model.eval()(x), rtol=0, atol=0)
    got_ema = effvit.load_model(path, use_ema=True)
    torch.testing.assert_close(got_ema(x), ema.eval()(x), rtol=0, atol=0)
    assert got.pretrained_cfg["label_names"] == ("a", "b", "c") and got.img_size == (64, 64)
    with pytest.raises(ValueError, match="holds efficientvit_m0 weights, not efficientvit_m1"):
        effvit.load_model(path, model_name="m1")


@pytest.mark.slow
@torch.no_grad()
def test_load_model_rebuilds_a_timm_backbone_trained_by_effvit(tmp_path, capsys):
    """`effvit train --model efficientnet_lite0` checkpoints go through the same loader to eval/predict."""
    from PIL import Image

    from effvit.cli import main
    from effvit.models.weights import model_meta

    torch.manual_seed(0)
    net = timm.create_model("efficientnet_lite0", num_classes=3, in_chans=1).eval()
    meta = model_meta(net, {"dataset": "folder", "img_size": 64, "in_chans": 1, "class_names": ["a", "b", "c"],
                            "mean": [0.5], "std": [0.25], "interpolation": "bilinear", "crop_pct": 1.0})
    path = tmp_path / "best.pth"
    torch.save({"format": FORMAT_TAG, "state_dict": net.state_dict(), "meta": meta, "epoch": 1}, path)
    model = effvit.load_model(path)
    x = _x(2, 1, 64, 64)
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    cfg = resolve_data_config(model=model)
    assert cfg["input_size"] == (1, 64, 64) and cfg["mean"] == (0.5,) and cfg["interpolation"] == "bilinear"
    assert model.pretrained_cfg["label_names"] == ("a", "b", "c")
    Image.new("L", (80, 70), 128).save(tmp_path / "img.png")
    assert main(["predict", str(tmp_path / "img.png"), "-c", str(path), "--topk", "1"]) == 0
    assert capsys.readouterr().out.split()[-1] in ("a", "b", "c")
