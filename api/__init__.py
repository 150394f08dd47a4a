"""The HTTP service: OpenAI-compatible /v1/files, /v1/batches, /v1/models. Never imports torch or worker."""
