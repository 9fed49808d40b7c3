"""Data layer: manifest loading, condition vectors, image decoding, the training dataset and demo data.

Modules are imported explicitly (``from ldmflow.data.manifest import load_manifest``) so that torch is only
loaded by the code that needs the dataset.
"""
