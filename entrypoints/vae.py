"""MLflow entry point `vae`: runs `ldmflow vae` with the project's parameters."""

import sys

from ldmflow.projects import run_entry_point

if __name__ == "__main__":
    run_entry_point("vae", sys.argv[1:])
