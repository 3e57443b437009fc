"""The relay link: batched, compressed, acknowledged-after-fsync forwarding between relays.

Modules, from the wire up (protocol: ``docs/relay-link.md``):

* ``wire``: frames, batch bodies and the spool-record path envelope (encode/decode, bounds);
* ``session``: the sans-IO state machines of both ends (negotiation, window, acks, dedup);
* ``ledger``: what the receiver committed per sending relay and epoch, in memory and on disk;
* ``protocol``: the thin Twisted protocols (``link+tls`` listener and forward output);
* ``output``: the forward output (spool records to batches, one owner connection, epoch);
* ``service``: the receiver's wiring (ledger, commit log, listener factory);
* ``metrics``: the link's histogram and gauges for /metrics.
"""
