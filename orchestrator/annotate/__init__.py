"""The labelling page (`run.py annotate RUN_DIR`): a localhost server, its page, its images.
Sits above campaign/."""
