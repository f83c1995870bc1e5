"""The Open Inference Protocol (KServe V2) apart from how it travels: its datatypes and
tensors, one inference call on a model's queue, and the metadata a model and the server give.
The REST routes (:mod:`ketch.http.oip`) and the gRPC service (:mod:`ketch.grpc.service`) are
two faces of what is here."""
