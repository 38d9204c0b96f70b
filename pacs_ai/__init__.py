"""pacs-ai: chest-radiograph AI listener (receive -> spool -> classify -> report -> send)."""

__version__ = "0.1.0"
