"""MLflow entry point `pipeline`: vae -> latent_ddpm -> sample -> evaluate as child runs (`ldmflow pipeline`)."""

import sys

from ldmflow.projects import run_entry_point

if __name__ == "__main__":
    run_entry_point("pipeline", sys.argv[1:])
