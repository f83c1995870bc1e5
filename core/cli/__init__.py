"""The ``ketch`` command line: ``ketch serve``, ``ketch worker``, the management commands, the
settings they read, and the HTTP client they use."""
