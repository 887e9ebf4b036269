"""Launching jobs: rendering and submitting Slurm batch scripts."""
