"""The models the management API's tests serve (``tests/test_admin.py``) and drive through the
``ketch models``/``ketch apps`` commands (``tests/test_admin_cli.py``)."""

SERVED = """
import time
import sys
import ketch

@ketch.model(version="1", idle_timeout_s=0.5)
def echo(xs):
    return [["v1", x] for x in xs]

@ketch.model
def slow(xs):
    print("slow is computing", file=sys.stderr, flush=True)
    time.sleep(1.0)  # the model's own work: long enough to be removed meanwhile
    return xs

@ketch.model
def plus_one(xs: list[float]) -> list[float]:
    return [x + 1 for x in xs]

@ketch.model
def plus_two(xs: list[float]) -> list[float]:
    return [x + 2 for x in xs]
"""

#: A second version of ``echo``, added through the API from its own file.
ECHO_V2 = """
import ketch

@ketch.model(name="echo", version="2")
def echo_v2(xs):
    return [["v2", x] for x in xs]
"""
