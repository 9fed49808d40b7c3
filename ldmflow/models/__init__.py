"""Model builders: the diffusers architectures ldmflow trains, configured from settings."""
