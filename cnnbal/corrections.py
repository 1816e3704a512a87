"""The kinds of output correction cnnbal can fit and apply (docs/method.md section 8).

A :class:`Correction` is a kind and a few named float64 arrays:

==================  =============================  ====================================
kind                params                         corrected output
==================  =============================  ====================================
``affine``          ``H`` (K, K+1), ``gate``       ``W p + b`` on rows with max < gate
                                                   (Choi 2017; :mod:`cnnbal.core`)
``logit_bias``      ``bias`` (K,), ``temperature``  ``softmax((log p + bias) / T)``
``temperature``     ``temperature``                ``softmax(log p / T)``
``vector_scaling``  ``scale`` (K,), ``bias`` (K,)  ``softmax(scale * log p + bias)``
==================  =============================  ====================================

The log-linear kinds work on ``log p`` with ``p`` floored at the smallest
normal number of the input's dtype (:func:`log_probs`), so an exact zero
gives a large negative but finite logit (``log(tiny)`` is about -87.3 for
float32 and -708 for float64) and never a NaN. A row's log-probabilities are
only defined up to a constant (a row that sums to ``s`` instead of 1 adds
``-log s`` to every entry), and softmax ignores that constant, so rows are not
renormalised first (except for ``vector_scaling``, see :func:`normalised_log`).

Pure functions: no I/O, no printing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnbal.errors import CnnbalError

__all__ = ["KINDS", "Correction", "log_probs", "normalised_log", "softmax_rows"]

#: The correction kinds, in the order the artifact documents them.
KINDS = ("affine", "logit_bias", "temperature", "vector_scaling")

# The arrays each kind stores, with their shapes ("K": n_classes, "K+1", "": a scalar).
_PARAM_SHAPES: dict[str, dict[str, tuple[str, ...]]] = {
    "affine": {"H": ("K", "K+1"), "gate": ()},
    "logit_bias": {"bias": ("K",), "temperature": ()},
    "temperature": {"temperature": ()},
    "vector_scaling": {"scale": ("K",), "bias": ("K",)},
}


def log_probs(probs: np.ndarray) -> np.ndarray:
    """``log p`` in float64 with ``p`` floored at ``np.finfo(probs.dtype).tiny``.

    The floor follows the input's precision: a float32 file cannot hold a
    positive probability below float32's tiny (subnormals are flushed on
    read), so an exact zero there means "below 1.2e-38", not "impossible".

    Parameters
    ----------
    probs : ndarray of shape (n_samples, n_classes), float32 or float64

    Returns
    -------
    ndarray of shape (n_samples, n_classes), float64
    """
    dtype = probs.dtype if probs.dtype in (np.float32, np.float64) else np.float64
    out = np.maximum(np.asarray(probs, dtype=np.float64), float(np.finfo(dtype).tiny))
    np.log(out, out=out)
    return out


def normalised_log(z: np.ndarray) -> np.ndarray:
    """``z`` minus each row's log-sum-exp, in place: the log of the row renormalised to sum to 1.

    Vector scaling multiplies each class's log-probability by its own factor,
    so, unlike the other kinds, it is not blind to a per-row constant: its
    logits are taken from renormalised rows.
    """
    top = z.max(axis=1, keepdims=True)
    z -= top + np.log(np.exp(z - top).sum(axis=1, keepdims=True))
    return z


def softmax_rows(logits: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise softmax, stable (the row maximum is subtracted first).

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes), float64
    out : ndarray, optional
        Where to write (may be ``logits`` itself).

    Returns
    -------
    ndarray of shape (n_samples, n_classes)
        Non-negative rows summing to 1 (the maximum of each row maps to a
        positive number, so no row is all zero).
    """
    out = np.subtract(logits, logits.max(axis=1, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


def _scalar(value, name: str, *, positive: bool = False, allow_inf: bool = False) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != ():
        raise CnnbalError(f"{name}: expected a number, got an array of shape {arr.shape}")
    v = float(arr)
    if np.isnan(v) or (np.isinf(v) and not allow_inf):
        raise CnnbalError(f"{name}: {v} is not a finite number")
    if positive and not v > 0:
        raise CnnbalError(f"{name}: must be > 0, got {v:g}")
    return arr


def _vector(value, name: str, n_classes: int | None = None) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise CnnbalError(
            f"{name}: expected a vector of one value per class, got shape {arr.shape}"
        )
    if n_classes is not None and arr.size != n_classes:
        raise CnnbalError(f"{name}: expected {n_classes} values, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise CnnbalError(f"{name}: contains a non-finite value")
    return arr


@dataclass(frozen=True)
class Correction:
    """A fitted output correction: a kind of :data:`KINDS` and its arrays.

    Build one with the constructors (:meth:`affine`, :meth:`logit_bias`,
    :meth:`temperature`, :meth:`vector_scaling`), which check the arrays;
    :meth:`from_arrays` reads back what :meth:`to_arrays` wrote.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`.
    params : dict of str to ndarray
        float64 arrays; names and shapes per kind in the module docstring.
    """

    kind: str
    params: dict[str, np.ndarray]

    # ------------------------------------------------------------------ constructors

    @classmethod
    def affine(cls, H: np.ndarray, gate: float = float("inf")) -> Correction:
        """The affine correction ``[W b]`` of Choi (2017), applied to rows with max < ``gate``."""
        H = np.array(H, dtype=np.float64)
        if H.ndim != 2 or H.shape[1] != H.shape[0] + 1:
            raise CnnbalError(f"H: expected shape (K, K+1), got {H.shape}")
        if not np.all(np.isfinite(H)):
            raise CnnbalError("H: contains a non-finite value")
        gate_arr = _scalar(gate, "gate", allow_inf=True)
        if not float(gate_arr) > 0:
            raise CnnbalError(f"gate: must be > 0, got {float(gate_arr):g}")
        return cls("affine", {"H": H, "gate": gate_arr})

    @classmethod
    def logit_bias(cls, bias: np.ndarray, temperature: float = 1.0) -> Correction:
        """Per-class additive biases on ``log p``: ``softmax((log p + bias) / temperature)``."""
        return cls(
            "logit_bias",
            {
                "bias": _vector(bias, "bias"),
                "temperature": _scalar(temperature, "temperature", positive=True),
            },
        )

    @classmethod
    def temperature(cls, t: float) -> Correction:
        """Temperature scaling (Guo et al. 2017): ``softmax(log p / t)``; keeps the argmax."""
        return cls("temperature", {"temperature": _scalar(t, "temperature", positive=True)})

    @classmethod
    def vector_scaling(cls, scale: np.ndarray, bias: np.ndarray) -> Correction:
        """Vector scaling (Guo et al. 2017): ``softmax(scale * log p + bias)``."""
        scale = _vector(scale, "scale")
        return cls(
            "vector_scaling",
            {"scale": scale, "bias": _vector(bias, "bias", len(scale))},
        )

    @classmethod
    def identity(cls, n_classes: int) -> Correction:
        """The zero logit bias: changes no prediction and returns softmax(log p) = p / sum(p)."""
        return cls.logit_bias(np.zeros(n_classes))

    # ------------------------------------------------------------------ properties

    @property
    def n_classes(self) -> int | None:
        """K, or None for ``temperature`` (which applies to any number of classes)."""
        if self.kind == "affine":
            return int(self.params["H"].shape[0])
        if self.kind == "temperature":
            return None
        return int(self.params["bias"].shape[0])

    @property
    def gate(self) -> float:
        """Rows whose maximum is at or above this are left unchanged (``inf``: none)."""
        if self.kind == "affine":
            return float(self.params["gate"])
        return float("inf")

    def changes_rows(self, row_max: np.ndarray) -> np.ndarray:
        """Which rows the correction touches (may change), as a boolean mask.

        Parameters
        ----------
        row_max : ndarray of shape (n_samples,)
            ``probs.max(axis=1)``.

        Returns
        -------
        ndarray of shape (n_samples,), bool
            affine: ``row_max < gate``; every other kind touches every row.
        """
        row_max = np.asarray(row_max)
        if self.kind == "affine":
            return row_max < self.gate
        return np.ones(row_max.shape, dtype=bool)

    # ------------------------------------------------------------------ apply

    def _scale_and_bias(self) -> tuple[np.ndarray | float, np.ndarray | float]:
        """``(a, c)`` such that the corrected logits are ``a * log p + c``."""
        if self.kind == "logit_bias":
            t = float(self.params["temperature"])
            return 1.0 / t, self.params["bias"] / t
        if self.kind == "temperature":
            return 1.0 / float(self.params["temperature"]), 0.0
        return self.params["scale"], self.params["bias"]

    def _logits(self, probs: np.ndarray) -> np.ndarray:
        if self.kind == "logit_bias":
            # (log p + b) / T with the sum formed first, so that the argmax is
            # the argmax of log p + b (a positive division keeps the order;
            # see apply for ties that rounding could create)
            z = log_probs(probs)
            z += self.params["bias"]
            z /= float(self.params["temperature"])
            return z
        scale, bias = self._scale_and_bias()
        z = log_probs(probs)
        if self.kind == "vector_scaling":
            z = normalised_log(z)
        z *= scale
        z += bias
        return z

    def apply(
        self, probs: np.ndarray, *, clip: bool = True, row_max: np.ndarray | None = None
    ) -> np.ndarray:
        """Corrected outputs.

        Parameters
        ----------
        probs : ndarray of shape (n_samples, n_classes)
        clip : bool
            affine only: clip negative scores and renormalise (see
            :func:`cnnbal.core.apply_correction`). The log-linear kinds always
            return probabilities.
        row_max : ndarray of shape (n_samples,), optional
            affine only: ``probs.max(axis=1)`` if the caller has it.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            float32 for float32 input, else float64. For ``logit_bias`` the
            argmax of each row equals ``argmax(log_probs(probs) + bias)``
            exactly (first maximum wins): where rounding in the softmax would
            tie the winner with an earlier class, the winner is raised by one
            unit in the last place.
        """
        self._check_width(probs)
        if self.kind == "affine":
            from cnnbal.core import apply_correction

            return apply_correction(self.params["H"], probs, self.gate, clip=clip, row_max=row_max)
        dtype = np.float32 if probs.dtype == np.float32 else np.float64
        logits = self._logits(probs)
        winner = logits.argmax(axis=1) if self.kind == "logit_bias" else None
        out = softmax_rows(logits, out=logits).astype(dtype, copy=False)
        if winner is not None:
            rows = np.flatnonzero(out.argmax(axis=1) != winner)
            if rows.size:
                cols = winner[rows]
                out[rows, cols] = np.nextafter(out[rows, cols], dtype(np.inf))
        return out

    def apply_predict(
        self, probs: np.ndarray, *, clip: bool = True, row_max: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, int | None]:
        """:meth:`apply`, the argmax of each corrected row, and the first non-finite row.

        One sweep for the affine kind (:func:`cnnbal.core.apply_correction_predict`):
        what ``cnnbal apply`` writes, without further passes over the result.

        Returns
        -------
        corrected : ndarray of shape (n_samples, n_classes)
        pred : ndarray of shape (n_samples,), int64
            ``corrected.argmax(axis=1)``, first maximum wins.
        first_nonfinite : int or None
            The first row with a NaN or inf corrected score (a corrupt
            correction), or None.
        """
        self._check_width(probs)
        if self.kind == "affine":
            from cnnbal.core import apply_correction_predict

            result = apply_correction_predict(
                self.params["H"], probs, self.gate, clip=clip, row_max=row_max
            )
            return result.corrected, result.pred, result.first_nonfinite
        from cnnbal.core import argmax_rows

        corrected = self.apply(probs, clip=clip, row_max=row_max)
        bad = ~np.isfinite(corrected).all(axis=1)
        first = int(np.flatnonzero(bad)[0]) if bad.any() else None
        return corrected, argmax_rows(corrected), first

    def predict(self, probs: np.ndarray) -> np.ndarray:
        """Predicted classes of the corrected outputs, without forming the softmax.

        For the log-linear kinds this is ``argmax(a * log p + c)`` (the softmax
        keeps the order); for affine it is the argmax of :meth:`apply`.

        Returns
        -------
        ndarray of shape (n_samples,), int64
        """
        self._check_width(probs)
        if self.kind == "affine":
            return self.apply(probs).argmax(axis=1)
        if self.kind == "temperature":
            return np.asarray(probs).argmax(axis=1)
        if self.kind == "logit_bias":
            z = log_probs(probs)
            z += self.params["bias"]
            return z.argmax(axis=1)
        return self._logits(probs).argmax(axis=1)

    def _check_width(self, probs: np.ndarray) -> None:
        k = self.n_classes
        if k is not None and (probs.ndim != 2 or probs.shape[1] != k):
            raise CnnbalError(
                f"the correction is for {k} classes but the outputs have shape {probs.shape}"
            )

    # ------------------------------------------------------------------ storage

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for an ``.npz``: ``kind`` (0-d str) and each param as float64."""
        arrays = {"kind": np.array(self.kind)}
        for name, value in self.params.items():
            arrays[name] = np.asarray(value, dtype=np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays) -> Correction:
        """Inverse of :meth:`to_arrays` (any mapping of name to array; extra names are ignored).

        Raises
        ------
        CnnbalError
            Unknown kind, a missing array, or an array of the wrong shape or value.
        """
        if "kind" not in arrays:
            raise CnnbalError("correction: no 'kind' entry")
        kind = str(np.asarray(arrays["kind"]))
        if kind not in KINDS:
            raise CnnbalError(
                f"correction: unknown kind {kind!r}; expected one of {', '.join(KINDS)}"
            )
        missing = [n for n in _PARAM_SHAPES[kind] if n not in arrays]
        if missing:
            raise CnnbalError(f"correction of kind {kind!r}: missing {', '.join(missing)}")
        p = {n: np.asarray(arrays[n]) for n in _PARAM_SHAPES[kind]}
        if kind == "affine":
            return cls.affine(p["H"], p["gate"])
        if kind == "logit_bias":
            return cls.logit_bias(p["bias"], p["temperature"])
        if kind == "temperature":
            return cls.temperature(p["temperature"])
        return cls.vector_scaling(p["scale"], p["bias"])

    def as_dict(self) -> dict:
        """JSON-friendly ``{"kind": ..., name: number or list}`` (``inf`` stays a float)."""
        out: dict = {"kind": self.kind}
        for name, value in self.params.items():
            out[name] = float(value) if np.ndim(value) == 0 else np.asarray(value).tolist()
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Correction):
            return NotImplemented
        return (
            self.kind == other.kind
            and self.params.keys() == other.params.keys()
            and all(np.array_equal(self.params[n], other.params[n]) for n in self.params)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays
