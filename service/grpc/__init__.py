"""gRPC front-end: unary and bidirectional streaming for robots, health and reflection. No torch here."""
