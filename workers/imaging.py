"""imaging (to be built; see ARCHITECTURE)."""
