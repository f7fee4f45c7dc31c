"""Detectors: one small state machine per file."""
