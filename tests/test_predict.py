"""``effvit.predict``: top-k classes of image files, undecodable files listed apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from effvit.bench.weights import randomise_norms
from effvit.data import eval_transform
from effvit.models import create_model
from effvit.predict import ClassScore, predict

LABELS = ["ant", "bee", "cat"]


@pytest.fixture
def model():
    m = randomise_norms(create_model("m0", num_classes=3, img_size=32)).eval()
    m.pretrained_cfg["label_names"] = LABELS
    return m


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        f = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 30 + 10 * i, 3), dtype=np.uint8)).save(f)
        out.append(str(f))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return out[:1] + [str(bad)] + out[1:]


def test_topk_is_the_models_softmax_in_order(model, files):
    res = predict(model, files, topk=2, batch_size=2)
    readable = [f for f in files if not f.endswith("bad.png")]
    assert [p.file for p in res.images] == readable
    assert len(res.unreadable) == 1 and res.unreadable[0].startswith(f"{files[1]} (UnidentifiedImageError")
    transform = eval_transform(model)
    for p in res.images:
        x = transform(Image.open(p.file).convert("RGB"))[None]
        with torch.no_grad():
            probs = model(x).softmax(dim=1)[0]
        top = probs.topk(2)
        assert [s.index for s in p.predictions] == top.indices.tolist()
        assert [s.label for s in p.predictions] == [LABELS[i] for i in top.indices.tolist()]
        assert [s.prob for s in p.predictions] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_topk_beyond_the_classes_gives_every_class(model, files):
    res = predict(model, files[:1], topk=10)
    scores = res.images[0].predictions
    assert sorted(s.index for s in scores) == [0, 1, 2] and all(isinstance(s, ClassScore) for s in scores)
    assert sum(s.prob for s in scores) == pytest.approx(1.0, abs=1e-5)
    assert [s.prob for s in scores] == sorted((s.prob for s in scores), reverse=True)
