"""The photo pool builder on a tiny fake package tree: fetch and unpack, photo check, dedup by perceptual
hash, the drop list, the split by photo and the manifest (licenses from the copyright file)."""

import csv
import json
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("imagehash", reason="the pool builder needs effvit[pool] (ImageHash)")

from effvit.rotation.pool import (  # noqa: E402
    Source,
    build_pool,
    deduplicate,
    photo_check,
    read_drops,
    split_of,
)

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fake

Files: *
Copyright: 2020, Default Person
License: GPL-2+

Files: nature/*.jpg
Copyright: 2019, Ansel Photographer <ansel@example.org>
License: CC-BY-SA-4.0
"""


def photo(seed: int, size=(400, 300)) -> Image.Image:
    """A photo-like image: smooth structure plus sensor noise (no two neighbours exactly equal)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    arr = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def fake_tree(root: Path) -> dict[str, Path]:
    """Three packages' unpacked contents."""
    deb = root / "wall"
    (deb / "usr/share/backgrounds/nature").mkdir(parents=True)
    (deb / "usr/share/backgrounds/art").mkdir(parents=True)
    (deb / "usr/share/doc/wall").mkdir(parents=True)
    (deb / "usr/share/doc/wall/copyright").write_text(COPYRIGHT)
    for i in range(4):
        photo(i).save(deb / f"usr/share/backgrounds/nature/p{i}.jpg", quality=92)
    photo(10, (800, 600)).save(deb / "usr/share/backgrounds/nature/big.jpg", quality=92)
    photo(11).save(deb / "usr/share/backgrounds/art/render.png")  # dropped by hand
    Image.new("RGB", (500, 400), "navy").save(deb / "usr/share/backgrounds/art/flat.png")  # a screenshot
    photo(12, (200, 150)).save(deb / "usr/share/backgrounds/nature/small.jpg")  # too small
    cut = photo(13).convert("RGBA")
    cut.putalpha(Image.new("L", cut.size, 0).resize(cut.size))
    cut.save(deb / "usr/share/backgrounds/art/cutout.png")
    (deb / "usr/share/backgrounds/nature/link.jpg").symlink_to("p0.jpg")
    whl = root / "pkg"
    (whl / "pkg/data").mkdir(parents=True)
    (whl / "pkg-1.2.dist-info").mkdir()
    (whl / "pkg-1.2.dist-info/METADATA").write_text("Metadata-Version: 2.1\nName: pkg\nVersion: 1.2\n"
                                                   "License: BSD-3-Clause\nAuthor: The Pkg Team\n")
    photo(10, (400, 300)).save(whl / "pkg/data/big_copy.png")  # the wallpaper again, smaller
    photo(20).save(whl / "pkg/data/own.png")
    photo(11).resize((360, 270)).save(whl / "pkg/data/render_copy.png")  # goes with the dropped render
    npm = root / "npmpkg" / "package"
    (npm / "fixtures").mkdir(parents=True)
    (npm / "package.json").write_text(json.dumps({"name": "npmpkg", "version": "3.0.1", "license": "MIT",
                                                  "author": {"name": "N. P. M."}}))
    photo(30).save(npm / "fixtures/cat.jpg")
    return {"wall": deb, "pkg": whl, "npmpkg": npm.parent}


def archives(tree: dict[str, Path], folder: Path) -> dict[str, Path]:
    folder.mkdir()
    out = {}
    if shutil.which("dpkg-deb"):
        (tree["wall"] / "DEBIAN").mkdir()
        (tree["wall"] / "DEBIAN/control").write_text("Package: wall\nVersion: 1:2.0-1\nArchitecture: all\n"
                                                     "Maintainer: x <x@example.org>\nDescription: fake\n")
        out["wall"] = folder / "wall_1%3a2.0-1_all.deb"
        subprocess.run(["dpkg-deb", "-b", "--root-owner-group", str(tree["wall"]), str(out["wall"])],
                       check=True, capture_output=True)
    out["pkg"] = folder / "pkg-1.2-py3-none-any.whl"
    with zipfile.ZipFile(out["pkg"], "w") as z:
        for f in tree["pkg"].rglob("*"):
            z.write(f, f.relative_to(tree["pkg"]).as_posix())
    out["npmpkg"] = folder / "npmpkg-3.0.1.tgz"
    with tarfile.open(out["npmpkg"], "w:gz") as t:
        t.add(tree["npmpkg"] / "package", "package")
    return out


@pytest.mark.slow
def test_pool_from_a_fake_package_tree(tmp_path):
    if not shutil.which("dpkg-deb"):
        pytest.skip("dpkg-deb (Debian's package tool) is not installed")
    made = archives(fake_tree(tmp_path / "src"), tmp_path / "made")
    calls = []

    def downloader(source: Source, folder: Path) -> Path:  # the registry, offline
        calls.append(str(source))
        folder.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(made[source.name], folder))

    drops = tmp_path / "drops.txt"
    drops.write_text("# hand-made\ndebian:wall:*/art/render.png  # a 3D render\n")
    sources = [Source.parse("debian:wall"), Source.parse("pypi:pkg"), Source.parse("npm:npmpkg")]
    out = tmp_path / "pool"
    report = build_pool(sources, tmp_path / "cache", out, drops=read_drops(drops), min_side=256,
                        short_side=256, val=0.3, test=0.3, downloader=downloader, log=lambda s: None)
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    by_path = {r["source_path"]: r for r in rows}
    # 4 + big photos of the deb, pkg's own photo, the npm fixture; the smaller copy of big.jpg is a duplicate
    assert sorted(by_path) == ["package/fixtures/cat.jpg", "pkg/data/own.png"] + \
        [f"usr/share/backgrounds/nature/{n}.jpg" for n in ("big", "p0", "p1", "p2", "p3")]
    assert len(report.kept) == 7
    rejected = {r["key"]: r["reason"] for r in csv.DictReader(open(out / "rejected.csv"))}
    assert rejected["pypi:pkg:pkg/data/big_copy.png"].startswith(
        "duplicate of debian:wall:usr/share/backgrounds/nature/big.jpg")
    assert rejected["debian:wall:usr/share/backgrounds/art/render.png"] == "dropped: a 3D render"
    assert rejected["pypi:pkg:pkg/data/render_copy.png"].startswith(
        "duplicate of debian:wall:usr/share/backgrounds/art/render.png")
    assert rejected["pypi:pkg:pkg/data/render_copy.png"].endswith("dropped with it: a 3D render")
    assert rejected["debian:wall:usr/share/backgrounds/art/flat.png"].startswith("flat")
    assert rejected["debian:wall:usr/share/backgrounds/art/cutout.png"].startswith("see-through")
    assert rejected["debian:wall:usr/share/backgrounds/nature/small.jpg"].startswith("small (200x150")
    assert not any("link.jpg" in k for k in rejected)  # a symlink is not a second photo
    # the manifest: license and author per file from the copyright file or the package metadata
    big = by_path["usr/share/backgrounds/nature/big.jpg"]
    assert big["package"] == "debian:wall" and big["version"] == "1:2.0-1"
    assert big["license"] == "CC-BY-SA-4.0" and big["author"] == "2019, Ansel Photographer <ansel@example.org>"
    assert by_path["pkg/data/own.png"]["license"] == "BSD-3-Clause"
    assert by_path["pkg/data/own.png"]["author"] == "The Pkg Team"
    cat = by_path["package/fixtures/cat.jpg"]
    assert cat["license"] == "MIT" and cat["author"] == "N. P. M."
    for r in rows:  # each file written where the manifest says, upright, at most short_side short
        img = Image.open(out / r["file"])
        assert r["file"].startswith(r["split"] + "/") and min(img.size) == 256 == min(int(r["width"]),
                                                                                     int(r["height"]))
        assert r["split"] == split_of(r["phash"], 0.3, 0.3)
        assert len(r["sha256"]) == len(r["archive_sha256"]) == 64
    assert sorted(p.name for p in (out / "sheets").iterdir())[-1] == "sheet-000.jpg"
    assert calls == ["debian:wall", "pypi:pkg", "npm:npmpkg"]
    # a second run: nothing unpacked again, the same pool
    build_pool(sources, tmp_path / "cache", out, drops=read_drops(drops), min_side=256, short_side=256,
               val=0.3, test=0.3, downloader=downloader, log=lambda s: None, sheets=False)
    assert list(csv.DictReader(open(out / "manifest.csv"))) == rows


def test_reserved_sources_are_refused_and_the_independent_set_takes_only_them(tmp_path):
    for spec in ("debian:ukui-wallpapers", "debian:lomiri-wallpapers-16.04", "pypi:matplotlib"):
        assert Source.parse(spec).reserved
        with pytest.raises(ValueError, match="reserved"):
            build_pool([Source.parse(spec)], tmp_path, tmp_path / "out", log=lambda s: None,
                       downloader=lambda s, f: pytest.fail("downloaded a reserved source"))
    assert not Source.parse("mate-backgrounds").reserved and Source.parse("mate-backgrounds").kind == "debian"
    with pytest.raises(ValueError, match="not reserved"):
        build_pool([Source.parse("debian:mate-backgrounds")], tmp_path, tmp_path / "out", independent=True)
    with pytest.raises(ValueError, match="KIND:NAME"):
        Source.parse("cargo:serde")


def test_deduplicate_keeps_the_largest_copy():
    import imagehash  # noqa: F401

    from effvit.rotation.pool import Candidate, perceptual_hash

    a, b = photo(1, (600, 450)), photo(2)
    cands = [Candidate("x:a", "small.png", Path("s"), 300, 225, perceptual_hash(a.resize((300, 225)))),
             Candidate("x:b", "big.png", Path("b"), 600, 450, perceptual_hash(a)),
             Candidate("x:c", "other.png", Path("o"), 400, 300, perceptual_hash(b))]
    kept, rejected = deduplicate(cands, max_distance=8)
    assert [c.path for c in kept] == ["big.png", "other.png"]
    assert len(rejected) == 1 and rejected[0].key == "x:a:small.png" and "x:b:big.png" in rejected[0].reason


def test_photo_check_split_and_drop_list_errors(tmp_path):
    assert photo_check(photo(0)) is None
    assert photo_check(Image.new("RGB", (300, 300), "white")).startswith("flat")
    stripes = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (300, 8))[:, :300])
    assert photo_check(stripes.convert("RGB")).startswith("few colours")
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(2000):
        counts[split_of(f"{i:016x}")] += 1
    assert 150 < counts["val"] < 250 and 150 < counts["test"] < 250  # 10% each
    assert split_of("abc") == split_of("abc")
    bad = tmp_path / "drops.txt"
    bad.write_text("render.png # no package\n")
    with pytest.raises(ValueError, match="drops.txt:1: expected"):
        read_drops(bad)
    assert read_drops(None) == []


def test_wheel_license_text_falls_back_to_the_classifiers(tmp_path):
    from effvit.rotation.pool import Fetched, license_of

    info = tmp_path / "pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pkg\nLicense: Files: *\n        Copyright: the "
                                   "authors\n        License: BSD-3-Clause\nAuthor: A. Author\n"
                                   "Classifier: License :: OSI Approved :: BSD License\n\nLong description\n")
    fetched = Fetched(Source.parse("pypi:pkg"), tmp_path, "1.0", "0" * 64)
    assert license_of(fetched, "pkg/data/a.png") == ("BSD License", "A. Author")
