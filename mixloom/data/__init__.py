"""Training data: JSONL formats and validation (`formats`, torch-free, used by the API) and
tokenisation with loss masks and batching (`tokenize`, needs torch and transformers, used by
the worker). Import the submodule you need; this package imports neither."""
