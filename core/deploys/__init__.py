"""Deploys: code pushed to a running server with its environment: the archive it travels in,
the environments built for it with uv, the store that keeps each version, and the deployer
that turns an upload into models that answer."""
