"""MLflow entry point `sweep`: runs `ldmflow sweep` with the project's parameters (the stage's own options go in
-P stage_options='--manifest_path ... --output_dir ...')."""

import sys

from ldmflow.projects import run_entry_point

if __name__ == "__main__":
    run_entry_point("sweep", sys.argv[1:])
