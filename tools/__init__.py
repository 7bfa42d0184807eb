"""Developer tools that drive the platform from outside (dashboards, screenshots)."""
