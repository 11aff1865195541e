"""Which modules LoRA adapts, as an anchored regex (`--lora_targets`).

SmolVLM's vision tower (SigLIP) and its text model (Llama) share projection names (`q_proj`,
`k_proj`, `v_proj`), so PEFT's plain name matching would silently put adapters on the vision tower
as well. Every target here is therefore spelled with its full path: text projections only inside
`text_model.layers`, the connector by its own path, the vision tower only when asked for by name.

Accepted items:
- text-model projections: `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`;
- `connector`: the modality projection between the vision tower and the text model;
- `vision`: every attention and MLP projection of the vision tower (a deliberate choice);
- `re:REGEX`, alone: a regex PEFT full-matches against module names, used as written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import ElementalError

TEXT_PROJECTIONS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
CONNECTOR = r".*connector\.modality_projection\.proj"
VISION = r".*vision_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
DEFAULT_TARGETS: tuple[str, ...] = (*TEXT_PROJECTIONS, "connector")


def lora_target_regex(targets: Sequence[str] | None = None) -> str:
    """The anchored regex for `targets` (default: all text attention + MLP projections and the connector)."""
    items = [t.strip() for t in (targets if targets is not None else DEFAULT_TARGETS) if t.strip()]
    if not items:
        raise ElementalError("lora_targets is empty: name at least one module (e.g. q_proj,v_proj,connector)")
    raw = [t for t in items if t.startswith("re:")]
    if raw:
        if len(items) > 1:
            raise ElementalError("lora_targets: a 're:' regex must be the only item")
        pattern = raw[0][3:]
        try:
            re.compile(pattern)
        except re.error as e:
            raise ElementalError(f"lora_targets: invalid regex {pattern!r} ({e})") from None
        return pattern
    unknown = [t for t in items if t not in TEXT_PROJECTIONS and t not in ("connector", "vision")]
    if unknown:
        known = ", ".join([*TEXT_PROJECTIONS, "connector", "vision", "re:REGEX"])
        raise ElementalError(f"lora_targets: unknown module {unknown[0]!r} (known: {known})")
    parts = []
    by_block: dict[str, list[str]] = {}
    for t in items:
        if t in TEXT_PROJECTIONS:
            by_block.setdefault(TEXT_PROJECTIONS[t], []).append(t)
    if by_block:
        blocks = "|".join(f"{block}\\.({'|'.join(names)})" for block, names in by_block.items())
        parts.append(rf".*text_model\.layers\.\d+\.({blocks})")
    if "connector" in items:
        parts.append(CONNECTOR)
    if "vision" in items:
        parts.append(VISION)
    return "|".join(parts)
