"""The worker runtime: connections, queues, the job runner, and the process lifecycle."""
