"""Rules over a shipped configuration module (day-zero ports)."""
