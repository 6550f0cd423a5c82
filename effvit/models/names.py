"""Model names: every spelling of a variant that effvit accepts, reduced to the one it names."""

from __future__ import annotations

from .efficientvit import VARIANTS

PREFIX = "efficientvit_"


def variant_name(name: str) -> str | None:
    """'m0', 'M0', 'efficientvit_m0' or 'effvit/efficientvit_m0' -> 'efficientvit_m0'; None when the name
    is no EfficientViT-M variant (a timm model, say). A pretrained tag is the caller's to strip."""
    base = name.strip().lower().split("/")[-1]
    variant = base if base.startswith(PREFIX) else PREFIX + base
    return variant if variant in VARIANTS else None


def resolve_models(spec: str) -> list[str]:
    """'all', 'm0,m4' or full names -> variant names; an unknown name raises with the valid ones."""
    names = sorted(VARIANTS)
    if spec == "all":
        return names
    out = []
    for s in spec.split(","):
        s = s.strip().lower()
        name = variant_name(s)
        if name is None:
            raise ValueError(f"unknown model {s!r}; choose from {', '.join(n.removeprefix(PREFIX) for n in names)}")
        out.append(name)
    return out
