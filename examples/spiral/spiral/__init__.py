"""A classifier of points on interleaved spirals, trained elastically by elastic-train."""
