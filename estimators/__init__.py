"""Estimators: the memory estimator and the parallel performance model."""
