"""Real-world tests: private daemons on loopback, see conftest.py."""
