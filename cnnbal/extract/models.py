"""Model loading: a TorchScript archive, or a ``package.module:factory`` with a state dict."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cnnbal.errors import CnnbalError
from cnnbal.extract.preprocessing import first_line, require_torch

if TYPE_CHECKING:
    import torch


def load_model(
    spec: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load a classifier for :func:`~cnnbal.extract.extract`, in eval mode.

    Parameters
    ----------
    spec : str or path
        Either a TorchScript archive written by ``torch.jit.save``, or
        ``"package.module:factory"``: the factory is called with no arguments
        and must return a ``torch.nn.Module``. The module is imported from the
        installed packages, ``sys.path`` or the current directory.
    weights : str or path, optional
        A state dict saved with ``torch.save`` (optionally wrapped as
        ``{"state_dict": ...}``) to load into the factory's model. Read with
        ``torch.load(..., weights_only=True)``: no arbitrary objects are
        unpickled. Only with a factory.
    device : str or torch.device, default "cpu"
        Where a TorchScript archive is loaded (``map_location``): loading it
        straight onto the device it will run on also places the plain tensor
        attributes that ``Module.to`` would leave behind. A factory's model is
        built on the CPU; :func:`~cnnbal.extract.extract` moves it.

    Returns
    -------
    model : torch.nn.Module
        Maps a float batch of shape (B, C, H, W) to logits of shape (B, K).

    Raises
    ------
    CnnbalError
        The archive does not load, the factory does not import, raises or does
        not return a module, or the weights do not load or do not fit the model.
    """
    require_torch()
    import torch

    text = os.fspath(spec)
    if _is_factory_spec(text):
        model = _call_factory(text)
        if weights is not None:
            _load_weights(model, Path(weights), text)
    else:
        path = Path(text)
        if weights is not None:
            raise CnnbalError(
                f"{path}: --weights goes with a 'package.module:factory' model, "
                "not with a TorchScript archive"
            )
        if not path.is_file():
            raise CnnbalError(f"{path}: no such model file")
        try:
            model = torch.jit.load(str(path), map_location=torch.device(device))
        except Exception as error:  # torch raises many types for a file that is not an archive
            raise CnnbalError(
                f"{path}: not a TorchScript archive ({first_line(error)}); save the model "
                "with torch.jit.save, or pass 'package.module:factory' and --weights"
            ) from None
    return model.eval()


def _is_factory_spec(text: str) -> bool:
    """``package.module:factory``, as opposed to a file path (which may contain a drive colon)."""
    if Path(text).exists() or text.count(":") != 1:
        return False
    module, name = text.split(":")
    return (
        bool(module)
        and name.isidentifier()
        and all(part.isidentifier() for part in module.split("."))
    )


def _call_factory(spec: str):
    import torch

    module_name, factory_name = spec.split(":")
    # A console script does not put the current directory on sys.path, but a
    # user's own model module usually lives there.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module: ImportError, SyntaxError, anything it raises
        raise CnnbalError(
            f"{spec}: cannot import {module_name} ({type(error).__name__}: {first_line(error)})"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise CnnbalError(f"{spec}: module {module_name} has no callable {factory_name}")
    try:
        model = factory()
    except Exception as error:  # the user's code
        raise CnnbalError(
            f"{spec}: the factory raised {type(error).__name__} ({first_line(error)})"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise CnnbalError(
            f"{spec}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _load_weights(model, path: Path, spec: str) -> None:
    import torch

    if not path.is_file():
        raise CnnbalError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise CnnbalError(
            f"{path}: not a state dict torch.load(weights_only=True) can read ({first_line(error)})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CnnbalError(f"{path}: expected a state dict, found {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as error:
        raise CnnbalError(f"{path}: the weights do not fit {spec} ({first_line(error)})") from None
