"""loraplex: one base model, one LoRA/QLoRA adapter per dataset, each on its own target modules."""
__version__ = "0.1.0"

import os as _os

# Library progress bars (datasets' "Saving the dataset", transformers' "Loading weights") are noise
# around loraplex's own progress display.
_os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
