"""Thin MLflow Projects entry points; each calls the ldmflow click command of the same name.

MLflow Projects starts them with the `python` first on PATH; one that lacks ldmflow's packages is said in one line
(not an unexpected ModuleNotFoundError deep inside a step)."""

import importlib.util
import sys

_NEEDED = ("click", "numpy", "torch", "diffusers", "accelerate", "mlflow", "tifffile", "PIL", "safetensors")
_missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
if _missing:
    sys.exit(f"Error: {sys.executable} lacks ldmflow's packages ({', '.join(_missing)}): run ldmflow with the Python "
             "it is installed in (e.g. .venv/bin/ldmflow), or install ldmflow into this one.")
