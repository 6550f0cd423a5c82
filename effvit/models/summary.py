"""Each variant's size, cost, feature maps and the paper's numbers, as ``effvit info`` lists them."""

from __future__ import annotations

from .complexity import count_macs, count_params
from .efficientvit import VARIANTS, stage_resolutions
from .factory import create_model


def variant_summaries(names: list[str], img_size: tuple[int, int]) -> list[dict]:
    """One dict per variant at ``img_size``: params and MACs (millions; MACs without BN), the paper's
    MFLOPs and top-1, feature strides, stage widths and feature-map sizes."""
    rows = []
    for name in names:
        model = create_model(name, img_size=img_size)
        v = VARIANTS[name]
        rows.append({
            "model": name,
            "params_m": round(count_params(model) / 1e6, 3),
            "macs_m": round(count_macs(model, img_size) / 1e6, 1),
            "paper_mflops": v.paper_mflops,
            "strides": [f["reduction"] for f in model.feature_info],
            "widths": list(v.widths),
            "maps": [f"{h}x{w}" for h, w in stage_resolutions(img_size)],
            "paper_top1": v.top1,
        })
    return rows
