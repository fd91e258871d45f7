"""mlc_ray: multi-label image tagging at cluster scale.

Train a tagger with Ray Train, register it with calibrated thresholds in MLflow, promote it on
evidence, and tag millions of images in object storage with Ray Data into Parquet tag tables.
"""

__version__ = "0.1.0"
