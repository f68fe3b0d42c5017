"""The router's standard front doors, beside its native ``llmserve.v1.Generation``.

- ``openai_http``: the OpenAI-compatible HTTP API (``/v1/completions``, ``/v1/chat/completions``,
  ``/v1/models``) on FastAPI, served by ``http_server`` inside the router's event loop.
- ``kserve``: the KServe v2 / Triton gRPC inference protocol (``inference.GRPCInferenceService``)
  on the router's gRPC port, with the tensor names of Triton's vLLM backend.

Front doors translate, they do not serve: each turns its request into a
:class:`~router.generation.RouterRequest` and runs it through the same
:class:`~router.generation.GenerationCore` as ``Generate`` (routing, dispatch with retries,
tracing, metrics); only shapes and status codes are theirs.
"""
