"""`circuitctl compare RUN_DIR RUN_DIR [...] [--out DIR]` (placeholder, filled below)."""
