"""RELP both ways: the sans-IO session core and the Twisted server (input) and client
(output)."""
