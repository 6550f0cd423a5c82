"""Every variant (M0-M5) at 224 px as an fp32 ExecuTorch program with the XNNPACK delegate: written by
``effvit.deploy.mobile.export_executorch``, verified with ExecuTorch's runtime against the unfused PyTorch
model (random weights, random BN statistics), with what the delegate took and how long the lowering took.
The test suite lowers M0 only (a minute per variant on two cores); this script covers all six.

    python benchmarks/executorch_variants.py --out benchmarks/results/executorch_variants.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from effvit.bench.throughput import cpu_name
from effvit.bench.weights import randomise_norms
from effvit.deploy.mobile import export_executorch
from effvit.models import VARIANTS, create_model
from effvit.outputs import atomic_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(VARIANTS), help="comma-separated variants (default: all six)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = randomise_norms(create_model(name, img_size=args.img_size)).eval()
            path = Path(tmp) / f"{name}.pte"
            start = time.perf_counter()
            diff, delegation = export_executorch(model, path, args.img_size)
            row = {"model": name, "max_abs_diff": float(f"{diff:.3g}"), "subgraphs": delegation.subgraphs,
                   "delegated_ops": delegation.delegated_ops, "portable": delegation.portable,
                   "export_s": round(time.perf_counter() - start, 1), "pte_mb": round(path.stat().st_size / 1e6, 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
                  "torch": torch.__version__, "executorch": version("executorch"), "img_size": args.img_size,
                  "rows": rows}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp_out:
            tmp_out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
