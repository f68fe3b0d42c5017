"""llmserve: shared, torch-free pieces used by router, worker and clients.

``llmserve.v1`` holds the generated protobuf/gRPC code (see ``protos/codegen.py``).
"""
