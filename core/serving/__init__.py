"""Serving a request: admission (cache, stacking, signature checks), the model queue with its
adaptive batching, and the dispatcher that routes broker events to queues."""
