"""Generated protobuf and gRPC stubs. Never edit by hand."""
