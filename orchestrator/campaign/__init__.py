"""The campaign: the cycle state machine, its run-directory files, metrics, report.html, the
terminal display, export, the run-directory lock and the campaign command. Imports every layer
below it; the sweep and the labelling page sit above it."""
