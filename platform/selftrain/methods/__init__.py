"""Batch-level objectives: (model, images, targets) -> (loss, metrics). No Ray, no MLflow."""

from selftrain.methods.noisy_student import noisy_student_objective

METHODS = {"noisy_student": noisy_student_objective}
