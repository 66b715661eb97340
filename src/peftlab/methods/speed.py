"""Which tuners keep peftlab's speed paths, and the plain path for the rest.

The speed paths rewrite how the base runs, not what it computes: right-padded rows with no attention mask, the
shared prompt opening as a KV cache, the last decoder layer run from the first target on (`kernels.lastlayer`),
the lean SwiGLU and the fused RMSNorm (`kernels.memory`). They stay exact for a tuner whose layers act on each
token alone, through the modules those paths call (q_proj, the MLP's projections, the norms). For each tuner
named here `tests/methods/test_speed_paths.py` checks one training step through every path against the plain peft
forward: same loss to 1e-4 relative, same weight update.

A tuner outside that list (reached through `method.name: peft`) runs the plain path instead: left-padded masked
rows, no shared prefix, the original last layer, MLP and norms. The run's `result.json` says so (`plain_path`).
"""

from __future__ import annotations

import torch

from peftlab.kernels.lastlayer import WINDOWED
from peftlab.models.forward import PLAIN_PATH

# peft types checked through every speed path (tests/methods/test_speed_paths.py). Prompt learning keeps its own
# masked layout (`models.forward.takes_unmasked_rows`) and is checked by the training tests as before.
CHECKED = frozenset({
    "LORA", "ADALORA", "IA3", "VERA", "LOHA", "LOKR", "OFT", "BOFT", "LN_TUNING", "HRA", "FOURIERFT", "MISS", "SHIRA",
    "HIRA", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING",
})
# Tuners whose output at a token depends on the other tokens of the batch. Their rows keep the right-padded layout
# (plain peft's output depends on the padding too, and scoring a reloaded adapter pads the same way), but the paths
# that change which tokens run together are off: the shared prefix and the windowed last layer.
BATCH_MIXING = {
    "LILY": "LILY mixes its B experts by the router's mean over every token of the batch, so the shared prefix (a "
            "separate forward) and the windowed last layer (fewer tokens) would change its output",
}


def plain_path_reason(peft_type: str | None) -> str | None:
    """Why a tuner must run without (some of) the speed paths, or None where every speed path is exact for it."""
    if peft_type is None or peft_type in CHECKED:
        return None
    if peft_type in BATCH_MIXING:
        return BATCH_MIXING[peft_type]
    return (f"{peft_type}: not checked against peftlab's speed paths (right-padded rows, shared prefix, windowed "
            "last layer, lean SwiGLU, fused RMSNorm), so it runs the plain peft forward")


def use_plain_path(model: torch.nn.Module, reason: str, train) -> None:
    """Undo the load-time window on the last layer and turn the shared prefix off (`train`: the run's
    TrainConfig); a tuner never checked also gets the masked, left-padded rows."""
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    layer = layers[-1] if layers else None
    if layer is not None and hasattr(layer, WINDOWED):
        layer.forward = getattr(layer, WINDOWED)
        delattr(layer, WINDOWED)
    train.shared_prefix = False
    if reason not in BATCH_MIXING.values():
        setattr(model, PLAIN_PATH, reason)
