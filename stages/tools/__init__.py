"""Developer tools, run as ``python -m stages.tools.<name>`` (not pipeline stages)."""
