"""vidtune."""
