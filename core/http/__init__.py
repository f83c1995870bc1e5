"""The HTTP surface of the gateway: ketch's own routes, the Open Inference Protocol, the
management API, bearer tokens, the OpenAPI document, JSON bodies, and the Hypercorn server."""
