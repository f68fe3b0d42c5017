"""Generated code of the KServe v2 / Open Inference Protocol gRPC service (proto package
``inference``), from ``protos/llmserve/kserve/grpc_service.proto`` by ``protos/codegen.py``.

The router's KServe door imports it. Its descriptors live in a descriptor pool of their own (see
``protos/codegen.py``), so the same process may also import ``tritonclient.grpc``, whose
generated code registers the protocol's names in the default pool.
"""
