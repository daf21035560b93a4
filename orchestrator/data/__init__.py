"""Data: volume files, the Parquet pool and its storage, ingest, the simulator, images of volumes.
Imports only orchestrator.config and orchestrator.faults."""
