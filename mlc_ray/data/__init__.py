"""Data layer: manifests and label vocabularies, robust image decoding and preprocessing, demo data."""
