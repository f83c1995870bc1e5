"""Declarations: what a model, an application or a deployment is (its spec), the decorators
that build them, and the loader that finds them in the user's file."""
