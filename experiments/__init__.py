"""Launcher, benchmarks and experiments (not part of the app bundle's runtime path)."""
