"""results (to be built; see ARCHITECTURE)."""
