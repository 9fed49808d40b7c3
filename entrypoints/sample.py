"""MLflow entry point `sample`: runs `ldmflow sample` with the project's parameters."""

import sys

from ldmflow.projects import run_entry_point

if __name__ == "__main__":
    run_entry_point("sample", sys.argv[1:])
