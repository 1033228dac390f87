"""Generated from proto/dense/v1/dense.proto by service/grpc/codegen.py; do not edit."""
