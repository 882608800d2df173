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


from . import adapters  # noqa: E402  (loraplex.adapters.load after a plain `import loraplex`)
from .adapters import load  # noqa: E402
from .evaluation import evaluate_run as evaluate  # noqa: E402
from .exporting import ExportFormat, export  # noqa: E402
from .inspect_adapter import inspect_adapter as inspect  # noqa: E402
from .merging import MergeMethod, merge  # noqa: E402
from .pipeline import prepare_recipe as prepare  # noqa: E402
from .recipe import load_recipe  # noqa: E402
from .reporting import write_report as report  # noqa: E402
from .selection.operation import select  # noqa: E402
from .serving import serve  # noqa: E402
from .training.runner import train  # noqa: E402

__all__ = ["ExportFormat", "MergeMethod", "adapters", "evaluate", "export", "inspect", "load", "load_recipe", "merge",
           "prepare", "report", "select", "serve", "train"]
