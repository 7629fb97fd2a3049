"""SkySense / SkySense++ in pure torch (no file or network I/O). The model lands with its own issue."""
