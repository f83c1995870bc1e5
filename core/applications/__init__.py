"""Applications: several models behind one endpoint, combined by a selection policy, and the
policy state they keep."""
