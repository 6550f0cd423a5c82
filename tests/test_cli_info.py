import json

from effvit.cli import main


def test_info_table_lists_every_variant_with_paper_numbers(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name, params, top1 in [("efficientvit_m0", "2.349M", "63.2"), ("efficientvit_m5", "12.474M", "77.1")]:
        line = next(ln for ln in out.splitlines() if ln.startswith(name))
        assert params in line and top1 in line and "16/32/64" in line


def test_info_json_and_unknown_model(capsys):
    assert main(["info", "--models", "m1,m3", "--img-size", "320", "192", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["efficientvit_m1", "efficientvit_m3"]
    assert rows[0]["maps"] == ["20x12", "10x6", "5x3"]
    assert main(["info", "--models", "m7"]) == 2
    assert "unknown model 'm7'" in capsys.readouterr().err


def test_variant_summaries_at_a_non_square_size():
    from effvit.models.summary import variant_summaries

    [square] = variant_summaries(["efficientvit_m0"], (224, 224))
    assert square["params_m"] == 2.349 and square["macs_m"] == 79.2 and square["paper_mflops"] == 79
    [row] = variant_summaries(["efficientvit_m0"], (320, 192))
    assert row["paper_top1"] == 63.2 and row["widths"] == [64, 128, 192] and row["strides"] == [16, 32, 64]
    assert row["maps"] == ["20x12", "10x6", "5x3"]
    assert 1.1 < row["macs_m"] / square["macs_m"] < 1.3  # 320x192 holds 1.22 times the pixels of 224x224
