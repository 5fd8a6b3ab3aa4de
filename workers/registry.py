"""registry (to be built; see ARCHITECTURE)."""
