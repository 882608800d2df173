"""loraplex: one base model, one LoRA/QLoRA adapter per dataset, each on its own target modules."""
__version__ = "0.1.0"

import os as _os

# Library progress bars (datasets' "Saving the dataset", transformers' "Loading weights") are noise
# around loraplex's own progress display.
_os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import logging as _logging
import warnings as _warnings

# peft imports bitsandbytes whenever it is installed (plain LoRA too), and on AVX512 CPUs bitsandbytes then logs
# that an optional kernels package is missing; its own warnings are not the user's business
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)

_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# The subpackage loraplex.train is imported first, so that the function below, not the module, is what
# `loraplex.train` names afterwards (a first import of a subpackage rebinds the parent's attribute).
from . import train as _train_package  # noqa: E402,F401
from . import adapters  # noqa: E402,F401  (loraplex.adapters.load after a plain `import loraplex`)


def train(recipe, overrides=None, only=None, resume=False, overwrite=False, progress=True):
    """Train one adapter per dataset of `recipe` (a YAML path, a dict or a Recipe); see `loraplex train`."""
    from .train import train as _train

    return _train(recipe, overrides, only, resume=resume, overwrite=overwrite, progress=progress)


def merge(run_dir, adapters, weights=None, method="auto", *, out_dir, **options):
    """Merge adapters of a run into its base as a standalone, verified model folder; see `loraplex merge`."""
    from .merging import merge as _merge

    return _merge(run_dir, adapters, weights, method, out_dir=out_dir, **options)


def inspect(adapter_dir, layer=None, module=None):
    """An adapter's config, scaling and per layer × module norms of A, B and ΔW; see `loraplex inspect`."""
    from .inspect_adapter import inspect_adapter

    return inspect_adapter(adapter_dir, layer, module)
