"""MLflow entry point `latent_ddpm`: runs `ldmflow latent-ddpm` with the project's parameters."""

import sys

from ldmflow.projects import run_entry_point

if __name__ == "__main__":
    run_entry_point("latent-ddpm", sys.argv[1:])
