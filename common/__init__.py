"""Settings and wire-format schemas shared by api/, worker/ and cli/ (pydantic only, no torch)."""
