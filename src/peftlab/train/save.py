"""What a trained run leaves on disk: a standard peft adapter folder, a full model folder, or the linear head."""

from __future__ import annotations

from pathlib import Path

from peftlab.methods.head import save_head
from peftlab.methods.registry import save_adapter
from peftlab.models.local import LoadedModel


def save_trained(model, loaded: LoadedModel, method: str, run_dir: Path) -> int:
    """Save the adapter (a standard peft folder) or, for full fine-tuning, the model folder; returns bytes on disk."""
    if method == "linear-head":

        return save_head(model, loaded.name, run_dir)
    out = run_dir / "adapter" if method != "full" else run_dir / "model"
    if method == "full":  # a vision-language model's processor holds its tokenizer and image settings
        model.save_pretrained(out, safe_serialization=True)
        (loaded.processor or loaded.tokenizer).save_pretrained(out)
    else:  # a PiSSA/OLoRA adapter is saved as the LoRA that fits the original base (methods.lifecycle)
        save_adapter(model, out)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix == ".safetensors")
