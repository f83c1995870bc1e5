"""What a running server tells: status events and logs, and Prometheus metrics."""
