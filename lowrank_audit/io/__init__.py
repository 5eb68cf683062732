"""Everything that touches files: checkpoints in, matrix selection, atomic outputs, provenance."""
