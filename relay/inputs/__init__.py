"""Listeners: plain TCP and UDP, the TLS server side, and what the kernel drops on UDP
sockets."""
