"""tasks (to be built; see ARCHITECTURE)."""
