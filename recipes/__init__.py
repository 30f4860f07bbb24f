"""SparseML recipes shipped with sparsebert (YAML data; this file only makes them installable)."""
