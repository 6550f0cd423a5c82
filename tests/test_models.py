"""The model: parity with timm, the paper's sizes, any resolution, timm-style API, clear input errors."""

import pytest
import timm
import torch
from conftest import randomize

import effvit
from effvit.models import VARIANTS
from effvit.models.attention import bias_index
from effvit.models.complexity import count_macs, count_params

MODELS = effvit.list_models()
SLOW = pytest.mark.slow
FAST_M0 = [MODELS[0], *(pytest.param(n, marks=SLOW) for n in MODELS[1:])]  # M0 in the fast lane, M1-M5 slow


@pytest.mark.parametrize("name", FAST_M0)
def test_logits_match_timm_in_eval_and_train(name, images):
    torch.manual_seed(0)
    ref = randomize(timm.create_model(name))
    ours = effvit.create_model(name)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for train in (False, True):  # train: BN uses batch statistics, a different code path
            ref.train(train)
            ours.train(train)
            diff = (ref(images) - ours(images)).abs().max().item()
            assert diff <= 1e-5, f"{name} train={train}: max abs diff {diff}"


@pytest.mark.parametrize("name", FAST_M0)
def test_paper_parameter_count_and_macs(name):
    model = effvit.create_model(name)
    v = VARIANTS[name]
    assert round(count_params(model) / 1e6, 3) == v.params_m
    macs = count_macs(model) / 1e6
    # README: "within 0.3% of the paper's FLOPs column"
    assert abs(macs / v.paper_mflops - 1) <= 0.003, f"{name}: {macs:.1f}M MACs vs paper {v.paper_mflops}M"


def test_list_models_and_unknown_name():
    assert MODELS == [f"efficientvit_m{i}" for i in range(6)]
    assert effvit.list_models("*m4") == ["efficientvit_m4"]
    with pytest.raises(ValueError, match="efficientvit_m0"):
        effvit.create_model("efficientvit_m9")
    # timm's hub-style names resolve to the same architecture
    assert effvit.create_model("timm/efficientvit_m1.r224_in1k").variant == "efficientvit_m1"


def test_zero_gamma_init_makes_every_block_an_identity():
    model = effvit.create_model("efficientvit_m0").eval()
    block = model.stages[1].blocks[0]
    x = torch.randn(2, 128, 7, 7)
    torch.testing.assert_close(block(x), x)
    assert torch.equal(model.head.linear.bias, torch.zeros(1000))
    assert 0.015 < model.head.linear.weight.std().item() < 0.025


@pytest.mark.parametrize("size", [256, 384, pytest.param(512, marks=SLOW), (320, 192), (200, 130), 64])
def test_any_resolution_gives_logits_and_stride_maps(size):
    h, w = (size, size) if isinstance(size, int) else size
    model = effvit.create_model("efficientvit_m2", img_size=size).eval()
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
        feats = model.forward_intermediates(x, intermediates_only=True)
    for f, stride, width in zip(feats, (16, 32, 64), (128, 192, 224)):
        assert f.shape == (2, width, -(-h // stride), -(-w // stride))


def test_other_input_size_than_built_for():
    # built for 224, run at 384 and at a map smaller than the stage-3 window (sub-grid of the table)
    model = randomize(effvit.create_model("efficientvit_m0")).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)
        assert model(torch.randn(1, 3, 160, 96)).shape == (1, 1000)


def test_bias_index_matches_levit_first_appearance_order():
    # the official code numbers offsets in order of first appearance over all point pairs
    r = 4
    points = [(i, j) for i in range(r) for j in range(r)]
    offsets, idx = {}, []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            offsets.setdefault(off, len(offsets))
            idx.append(offsets[off])
    assert torch.equal(bias_index(r), torch.tensor(idx).view(r * r, r * r))


def test_features_only_and_out_indices():
    feats = effvit.create_model("efficientvit_m4", features_only=True).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = feats(x)
    assert [tuple(f.shape) for f in out] == [(1, 128, 14, 14), (1, 256, 7, 7), (1, 384, 4, 4)]
    assert [i["reduction"] for i in feats.feature_info] == [16, 32, 64]
    sub = effvit.create_model("efficientvit_m4", features_only=True, out_indices=(1,)).eval()
    with torch.no_grad():
        assert [tuple(f.shape) for f in sub(x)] == [(1, 256, 7, 7)]
    assert "stages_2" not in dict(sub.named_children())  # stage 3 is not even built
    with pytest.raises(ValueError, match="out_indices"):
        effvit.create_model("efficientvit_m4", features_only=True, out_indices=(3,))


def test_timm_style_api():
    model = effvit.create_model("efficientvit_m0", num_classes=10, in_chans=1, img_size=64)
    cfg = model.pretrained_cfg  # timm's dict, adjusted to the model as built
    assert cfg["input_size"] == (1, 64, 64) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["num_classes"] == 10 and "label_names" not in cfg  # the ImageNet names no longer apply
    assert cfg["mean"] == (sum((0.485, 0.456, 0.406)) / 3,)  # one statistic for one channel
    imagenet = effvit.create_model("efficientvit_m0").pretrained_cfg
    assert len(imagenet["label_names"]) == 1000 and imagenet["mean"] == (0.485, 0.456, 0.406)
    x = torch.randn(2, 1, 64, 64)
    model.eval()
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, 192)
    assert model(x).shape == (2, 10)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 192)
    nwd = model.no_weight_decay()
    assert len(nwd) == 1 + 2 + 3 and all(n.endswith("attention_biases") for n in nwd)


def test_distillation_head_returns_both_in_train_and_mean_in_eval():
    model = randomize(effvit.create_model("efficientvit_m0", distillation=True, num_classes=7))
    x = torch.randn(2, 3, 64, 64)
    model.train()
    cls, dist = model(x)
    assert cls.shape == dist.shape == (2, 7)
    model.eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        expected = (model.head(feats) + model.head_dist(feats)) / 2
        torch.testing.assert_close(model(x), expected)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize(effvit.create_model("efficientvit_m0", num_classes=4, img_size=64)).train()
    x = torch.randn(4, 3, 64, 64)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class TestEvalBiasNeverStale:
    """The official code and timm cache the eval bias; ours must follow the live table everywhere."""

    def _pair(self):
        a = randomize(effvit.create_model("efficientvit_m0"), seed=1).eval()
        b = randomize(effvit.create_model("efficientvit_m0"), seed=2).eval()
        return a, b, torch.randn(2, 3, 224, 224)

    def test_after_load_state_dict(self):
        a, b, x = self._pair()
        with torch.no_grad():
            a(x)  # an eval forward first: where a cache would be filled
            a.load_state_dict(b.state_dict())
            torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)

    def test_after_train_step_and_eval_toggle(self):
        a, _, x = self._pair()
        with torch.no_grad():
            a(x)
        table = a.stages[0].blocks[0].mixer.m.attn.attention_biases
        a.train()
        opt = torch.optim.SGD([table], lr=10.0)
        a(x).sum().backward()
        opt.step()
        a.eval()
        fresh = effvit.create_model("efficientvit_m0").eval()
        fresh.load_state_dict(a.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(a(x), fresh(x), rtol=0, atol=0)

    def test_after_dtype_conversions(self):
        a, _, x = self._pair()
        with torch.no_grad():
            ref = a.double()(x.double())
            a(x.double())
            for dtype in (torch.float32, torch.bfloat16):
                a.to(dtype)
                out = a(x.to(dtype)).double()
                tol = 1e-4 if dtype == torch.float32 else 0.5
                assert (out - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item() / 10)
            a.half()
            assert a.stages[0].blocks[0].mixer.m.attn.window_bias().dtype == torch.float16


@pytest.mark.slow
def test_torchscript_trace_and_script_match_eager():
    model = randomize(effvit.create_model("efficientvit_m1")).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), ref, rtol=1e-5, atol=1e-5)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-5)
        # the scripted module keeps the any-size logic (windows, padding) that tracing freezes
        y = torch.randn(1, 3, 320, 192)
        torch.testing.assert_close(scripted(y), model(y), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """One graph (no breaks) through dynamo and AOT autograd; inductor's C++ build of it takes minutes on
    a 2-core machine and tests inductor more than the model (the compiled benchmark forms use it)."""
    model = randomize(effvit.create_model("efficientvit_m0", img_size=64)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(2, 1, 224, 224), "expected 3 input channels, got 1"),
        (torch.randn(2, 3, 12, 224), "smaller than one 16x16 patch"),
        (torch.zeros(2, 3, 224, 224, dtype=torch.uint8), "floating-point"),
        (torch.randn(3, 224, 224), "add a batch dimension"),
        (torch.randn(1, 3, 64, 64, dtype=torch.float64), "float64 but the model's weights are torch.float32"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(x, match):
    model = effvit.create_model("efficientvit_m0").eval()
    with pytest.raises(ValueError, match=match):
        model(x)
    feats = effvit.create_model("efficientvit_m0", features_only=True).eval()
    with pytest.raises(ValueError, match=match):
        feats(x)


@pytest.mark.parametrize("size", [0, 8, (224, 0)])
def test_building_below_one_patch_is_refused_clearly(size):
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        effvit.create_model("efficientvit_m0", img_size=size)
