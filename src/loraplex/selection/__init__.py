"""`target_modules: auto`: which modules should this dataset's adapter train? Measured, per dataset."""
from .choose import choose_modules, resolved_spec, trial_losses

__all__ = ["choose_modules", "resolved_spec", "trial_losses"]
