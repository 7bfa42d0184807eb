"""Shared kernel: event envelope, configuration, telemetry and adapters every service uses."""
