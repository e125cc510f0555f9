"""Protobuf/gRPC stubs for bundlerec.v1, generated from proto/bundlerec/v1/bundlerec.proto when the package is
built (client/setup.py) or by ``make proto`` for the editable dev install; never edited by hand, never committed."""
