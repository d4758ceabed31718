"""Helpers that write tiny Janus checkpoints and files for tests."""
