"""Command-line tools shipped with the package (``python -m efficientps_d2.tools.<name>``)."""
