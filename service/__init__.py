"""Online side of dense-serve: codec, CLI, and (later) the API, gRPC, queue and worker."""
