"""MLflow entry point `probe`: runs `ldmflow probe` with the project's parameters."""

import sys

from ldmflow.projects import run_entry_point

if __name__ == "__main__":
    run_entry_point("probe", sys.argv[1:])
