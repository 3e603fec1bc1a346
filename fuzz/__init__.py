"""Coverage-guided fuzzing (atheris) of every parser that reads bytes from outside.

One target a parser, each a module with a seed corpus in ``corpus/TARGET/``:

- ``proxy_v1``, ``proxy_v2``: PROXY protocol headers (superd.proxy ``parse`` and
  ``read_header``), from the balancers in ``proxy_from``;
- ``control_request``: a control-socket request (superd.control.parse_request);
- ``metrics_request``: the metrics HTTP request (superd.metrics.parse_request);
- ``udp_internal``: a datagram to a UDP internal service (superd.internal.udp_reply);
- ``yaml_config``: a configuration file and one include (superd.config.load);
- ``convert_inetd``, ``convert_xinetd``: ``superd convert`` of inetd.conf and xinetd files.

Run them all with ``python -m fuzz`` (``--seconds N`` each, ``--jobs J`` at once);
see :mod:`fuzz.__main__`.  An input that found a bug becomes a test: a
hypothesis ``@example`` in tests/test_proxy_props.py or a unit test beside
the parser's other tests.
"""
