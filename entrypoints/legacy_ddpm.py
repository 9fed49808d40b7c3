"""MLflow entry point `legacy_ddpm`: runs `ldmflow legacy-ddpm` with the project's parameters."""

import sys

from ldmflow.projects import run_entry_point

if __name__ == "__main__":
    run_entry_point("legacy-ddpm", sys.argv[1:])
