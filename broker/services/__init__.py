"""gRPC servicers: protobuf at the edge, domain calls inside."""
