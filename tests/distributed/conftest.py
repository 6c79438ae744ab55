"""Tests that run real training processes (gloo on CPU) use the session-wide
`digits_shards` fixture of tests/conftest.py and the helpers in harness.py."""
