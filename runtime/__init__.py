"""Graph loading and validation, executors (local, Ray), cache, resume and the CLI."""
