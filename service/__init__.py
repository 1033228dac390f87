"""The online side of dense-serve: front-ends (REST in `api`, gRPC in `grpc`), the queue between them and the
workers (`queue`: in-process or Redis Streams), the workers (`worker`), and the CLI. The front-ends import no
model library; only the worker reaches `models`."""
