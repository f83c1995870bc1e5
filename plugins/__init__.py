"""Built-in selection policies, registered through the same hooks as third-party plugins."""
