"""Models, their shared layers and the weight loader."""
