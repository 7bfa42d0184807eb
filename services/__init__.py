"""Centralino services: one package per department plus a small shared kernel."""
