"""phantoms (to be built; see ARCHITECTURE)."""
