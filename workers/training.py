"""training (to be built; see ARCHITECTURE)."""
