"""selftrain: Noisy Student self-training for image classification on Ray, tracked in MLflow."""

__version__ = "0.1.0"
