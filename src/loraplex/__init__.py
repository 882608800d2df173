"""loraplex: one base model, one LoRA/QLoRA adapter per dataset, each on its own target modules."""
__version__ = "0.1.0"

import os as _os

# Library progress bars (datasets' "Saving the dataset", transformers' "Loading weights") are noise
# around loraplex's own progress display.
_os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import warnings as _warnings

_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def train(recipe, overrides=None, only=None, resume=False, overwrite=False, progress=True):
    """Train one adapter per dataset of `recipe` (a YAML path, a dict or a Recipe); see `loraplex train`."""
    from .train import train as _train

    return _train(recipe, overrides, only, resume=resume, overwrite=overwrite, progress=progress)
