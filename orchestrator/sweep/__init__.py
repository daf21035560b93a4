"""Sweeps: many simulated campaigns on Ray Tune (`run.py sweep`). Sits above campaign/."""
