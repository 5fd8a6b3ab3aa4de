"""service stage of the node (to be built; see ARCHITECTURE)."""
