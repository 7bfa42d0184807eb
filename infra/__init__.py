"""Local infrastructure for Centralino: Kafka and FerretDB without Docker."""
