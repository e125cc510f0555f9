"""Generated protobuf/gRPC stubs for bundlerec.v1 (``make proto``; never edit by hand)."""
