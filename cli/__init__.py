"""The `diffbatch` command: serve, run, worker, api, beat, db, train-builtin."""
