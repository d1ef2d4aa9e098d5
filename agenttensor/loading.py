"""Load a model from a directory (``MODEL_DIR/model.py`` defining ``MODEL``) or a package name."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .errors import ConfigError, InputError
from .model import Model


def load_model(location: str) -> Model:
    """``models/seir`` (a directory with model.py) or ``models.seir`` (an importable module)."""
    path = Path(location)
    if path.is_dir():
        file = path / "model.py"
        if not file.exists():
            raise InputError(f"model directory {path} has no model.py (it must define MODEL = agenttensor.Model(...))")
        package_root = path.resolve().parent.parent
        module_name = f"{path.resolve().parent.name}.{path.resolve().name}"
        if (path / "__init__.py").exists() and (path.resolve().parent / "__init__.py").exists():
            if str(package_root) not in sys.path:
                sys.path.insert(0, str(package_root))
            module = importlib.import_module(module_name + ".model")
        else:
            spec = importlib.util.spec_from_file_location(f"agenttensor_user_model_{path.resolve().name}", file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    elif "/" not in location and not location.endswith(".py"):
        try:
            module = importlib.import_module(location if location.endswith(".model") else location + ".model")
        except ModuleNotFoundError:
            raise InputError(f"model {location!r} not found: give a directory containing model.py "
                             "(e.g. models/seir) or an importable module") from None
    else:
        raise InputError(f"model directory {location!r} does not exist")
    model = getattr(module, "MODEL", None)
    if not isinstance(model, Model):
        raise ConfigError(f"{location}: model.py must define MODEL = agenttensor.Model(...)")
    return model
