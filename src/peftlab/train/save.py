"""What a trained run leaves on disk: a standard peft adapter folder, a full model folder, or the linear head,
as the method's entry says (`Method.storage`).

The folder is written under a temporary name in the run folder and renamed into place once complete, so a full
disk or a stop mid-save leaves no adapter that looks whole but is cut off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from peftlab.core.errors import PeftlabError
from peftlab.core.files import save_reason
from peftlab.methods.registry import Method
from peftlab.models.hf_folder import LoadedModel
from peftlab.train.checkpoint import CHECKPOINT


def save_trained(model, loaded: LoadedModel, method: Method, run_dir: Path) -> int:
    """Save the adapter (a standard peft folder) or, for full fine-tuning, the model folder; returns bytes on disk.

    A failed save (a full disk, a read-only folder) is one line that says what a rerun does; an earlier folder of
    the same name stays as it was.
    """
    storage = method.storage
    if storage.save is None:
        raise PeftlabError(f"method '{method.name}' trains nothing to save")
    final = run_dir / storage.folder
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=run_dir))
        size = storage.save(model, loaded, staging)
        _swap_in(staging / final.name, final, staging / "previous")
    except (OSError, SafetensorError) as err:
        reason = save_reason(err)
        raise PeftlabError(f"{final}: cannot save it ({reason}); nothing was saved. {_rerun(run_dir)}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return size


def _swap_in(new: Path, final: Path, old: Path) -> None:
    """Rename `new` to `final`; an existing `final` (an earlier save) is moved aside first and removed after."""
    if final.exists():
        os.rename(final, old)
    try:
        os.rename(new, final)
    except OSError:
        if old.exists():
            os.rename(old, final)  # the earlier save stays in place
        raise


def _rerun(run_dir: Path) -> str:
    if (run_dir / CHECKPOINT).exists():
        return (f"The finished training is kept in {run_dir / CHECKPOINT}: once that is fixed, rerun with --resume, "
                "which saves it without training again")
    return "Once that is fixed, train the run again"
