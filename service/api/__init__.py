"""REST front-end (FastAPI). Turns requests into jobs for the broker; never imports torch."""
