"""Data layer: manifest loading, condition vectors, image decoding, the training dataset and demo data.

Modules are imported explicitly (``from ldmflow.data.manifest import load_manifest``) so that torch is only
loaded by the code that needs the dataset.
"""

DEFAULT_CONDITION_SPEC = "temperature:1,wind:3,wind_mag:1"  # the original scripts' default
