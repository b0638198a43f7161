"""L3, the client of a broker: ``pto.Runtime(level="host")`` (``runtime``), the
orchestration's ``ctx`` (``orchestration``), runs and their futures (``run``, ``runbook``),
the client's sockets (``connection``), tensor handles (``tensor``), the embedded broker it
may start (``embedded``) and traces (``trace``). Talks to broker and workers only through
messages (``pto.wire.protocol``) and shared memory, never by importing them.
"""
