"""Training of the built-in model (``diffbatch train-builtin``): corpus, tokenizer, objective, loop.

Pure torch/tokenizers/transformers, like the engine; nothing here is imported by the service.
"""
