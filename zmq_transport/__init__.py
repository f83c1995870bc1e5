"""ZeroMQ transport between the gateway and its worker processes.

The wire protocol is documented in :mod:`ketch.zmq_transport.protocol`; the broker (ROUTER, run
by the gateway) is in :mod:`.broker`; the worker loop (DEALER, run by model processes) in
:mod:`.worker`.
"""
