"""Framework adapters: turn a model artifact into a batch predict callable inside a worker."""
