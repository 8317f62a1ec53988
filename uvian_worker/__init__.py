"""The Uvian worker: runs the chat platform's background jobs from BullMQ."""

__version__ = "0.1.0"
