"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``, with Triton's
additions), served by grpcio's asyncio server in the gateway's own event loop: the same
queues, deadlines, tokens, metrics and errors as the HTTP routes (see ``docs/protocols.md``)."""
