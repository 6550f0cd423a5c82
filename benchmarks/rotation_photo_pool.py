"""Build the upright-photo pool of the rotation benchmark: train / val / test folders of real photos.

Sources, all installable here (no internet needed beyond the package registries):
- Debian ``plasma-workspace-wallpapers``: the natural photos among KDE's wallpapers;
- Debian ``mate-backgrounds``: MATE's nature photos;
- ``scikit-image``'s bundled sample photos (pip);
- three illustrated landscapes of ``plasma-workspace-wallpapers`` (Altai, Autumn, SafeLanding: a horizon,
  trees, mountains), for training only.
(``gnome-backgrounds`` 43 ships artwork, not photos, so it is not used. ``ukui-wallpapers``,
``lomiri-wallpapers*`` and matplotlib's sample images are reserved for independent tests: never here.)

    sudo apt-get install plasma-workspace-wallpapers mate-backgrounds
    python benchmarks/rotation_photo_pool.py --out runs/rotation/photos

Each photo is written once, upright, as PNG (lossless: no fresh JPEG grid) with its shorter side at most
--short-side pixels (1024 by default: a large photo gives many distinct crops at several scales). The
split is by photo and fixed, so test photos are never seen in training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PLASMA = ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
          "Kite", "OneStandsOut", "Path", "summer_1am"]
MATE = ["Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower"]
# illustrated scenes with a clear horizon among KDE's wallpapers: upright cues like a photo's; training only
SCENES = ["Altai", "Autumn", "SafeLanding"]
SKIMAGE = ["astronaut", "camera", "chelsea", "coffee", "rocket", "motorcycle", "page", "text", "clock",
           "horse"]
TEST = {"skimage-coffee", "skimage-rocket", "plasma-EveningGlow", "plasma-Path", "mate-Storm",
        "mate-LadyBird",
        "mate-Dune", "plasma-Grey"}
VAL = {"skimage-chelsea", "plasma-ColdRipple", "mate-Garden"}
INSTALL = "sudo apt-get install plasma-workspace-wallpapers mate-backgrounds"
# the reserved, independent test photos (data.md): never trained or tuned on. The natural photos of
# lomiri-wallpapers-16.04 / -20.04 and matplotlib's Grace Hopper; left out: a top-down shot with no
# "up" (Picture_0B), a texture (analogpattern) and the artwork.
INDEPENDENT = ["Kleiber_by_Lukas_Baubkus", "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly",
               "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi",
               "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich",
               "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi",
               "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi"]
INSTALL_INDEPENDENT = "sudo apt-get install lomiri-wallpapers-16.04 lomiri-wallpapers-20.04"


def plasma(name: str) -> Image.Image:
    folder = Path("/usr/share/wallpapers") / name / "contents" / "images"
    files = sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"{folder} has no image: {INSTALL}")
    with Image.open(max(files, key=lambda p: p.stat().st_size)) as img:  # the largest rendition
        return img.convert("RGB")


def mate(name: str) -> Image.Image:
    path = Path("/usr/share/backgrounds/mate/nature") / f"{name}.jpg"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {INSTALL}")
    with Image.open(path) as img:
        return img.convert("RGB")


def skimage_photo(name: str) -> Image.Image:
    from skimage import data

    if name == "motorcycle":
        arr = data.stereo_motorcycle()[0]
    else:
        arr = getattr(data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return Image.fromarray(arr).convert("RGB")


def photos():
    for n in PLASMA:
        yield f"plasma-{n}", lambda n=n: plasma(n)
    for n in SCENES:
        yield f"scene-{n}", lambda n=n: plasma(n)
    for n in MATE:
        yield f"mate-{n}", lambda n=n: mate(n)
    for n in SKIMAGE:
        yield f"skimage-{n}", lambda n=n: skimage_photo(n)


def independent(out: Path, short_side: int) -> int:
    """The reserved photos under out/ (upright, PNG), for testing only."""
    import matplotlib

    sources = [Path("/usr/share/backgrounds") / f"{n}.jpg" for n in INDEPENDENT]
    sources.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    out.mkdir(parents=True, exist_ok=True)
    for path in sources:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {INSTALL_INDEPENDENT}")
        with Image.open(path) as img:
            img = img.convert("RGB")
        if min(img.size) > short_side:
            s = short_side / min(img.size)
            img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)
        img.save(out / f"{path.stem}.png")
    print(f"{out}: {len(sources)} independent test photos")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/rotation/photos")
    ap.add_argument("--short-side", type=int, default=1024)
    ap.add_argument("--independent", metavar="DIR", help="instead: write the reserved independent test photos "
                    "(lomiri-wallpapers, matplotlib) to DIR")
    args = ap.parse_args()
    if args.independent:
        return independent(Path(args.independent), args.short_side)
    out = Path(args.out)
    counts = {"train": 0, "val": 0, "test": 0}
    for name, load in photos():
        split = "test" if name in TEST else "val" if name in VAL else "train"
        img = load()
        if min(img.size) > args.short_side:
            s = args.short_side / min(img.size)
            img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)
        (out / split).mkdir(parents=True, exist_ok=True)
        img.save(out / split / f"{name}.png")
        counts[split] += 1
    print(f"{out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
