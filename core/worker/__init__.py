"""The worker side: what runs inside a worker process, however it was started."""
