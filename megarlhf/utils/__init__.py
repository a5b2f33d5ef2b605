"""Small process-level helpers: threads per rank, logging set-up, metrics sinks, progress bars."""
