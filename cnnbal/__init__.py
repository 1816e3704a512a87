"""cnnbal: more balanced per-class accuracy for a trained classifier, after training.

Implements H. Choi (2017), "CNN Output Optimization for More Balanced
Classification": a small affine correction ``H`` (K x (K+1)) after the softmax,
fitted by weighted least squares on validation outputs. See ``docs/method.md``
sections cited in each module.

The numeric names below are loaded on first use (PEP 562): ``cnnbal --help``
and ``from cnnbal import __version__`` do not pay for importing numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnbal.errors import CnnbalError

__version__ = "0.1.0"

#: Names re-exported from :mod:`cnnbal.core`, imported when first accessed.
_CORE_NAMES = (
    "DEFAULT_PARAMS",
    "FitParams",
    "FitResult",
    "apply_correction",
    "class_accuracy",
    "fit",
    "fit_elaborated",
    "fit_naive",
)

if TYPE_CHECKING:
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


def __getattr__(name: str):
    if name in _CORE_NAMES:
        from cnnbal import core

        value = getattr(core, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'cnnbal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CORE_NAMES))


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
