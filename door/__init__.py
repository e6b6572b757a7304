"""The HTTP edge: an OpenAI-compatible front door beside the Kafka consumers (docs/interface.md,
"The HTTP door")."""
