"""MLflow entry point `evaluate`: runs `ldmflow evaluate` with the project's parameters."""

import sys

from ldmflow.projects import run_entry_point

if __name__ == "__main__":
    run_entry_point("evaluate", sys.argv[1:])
