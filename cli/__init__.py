"""The `diffbatch` command: serve, run, worker, api, beat, db, init-model."""
