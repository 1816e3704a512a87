"""cnnbal: more balanced per-class accuracy for a trained classifier, after training.

Implements H. Choi (2017), "CNN Output Optimization for More Balanced
Classification": a small affine correction ``H`` (K x (K+1)) after the softmax,
fitted by weighted least squares on validation outputs. See ``METHOD.md``
sections cited in each module.
"""

__version__ = "0.1.0"

from cnnbal.core import (
    DEFAULT_PARAMS,
    FitParams,
    FitResult,
    apply_correction,
    class_accuracy,
    fit,
    fit_elaborated,
    fit_naive,
)
from cnnbal.errors import CnnbalError

__all__ = [
    "DEFAULT_PARAMS",
    "CnnbalError",
    "FitParams",
    "FitResult",
    "__version__",
    "apply_correction",
    "class_accuracy",
    "fit",
    "fit_elaborated",
    "fit_naive",
]
