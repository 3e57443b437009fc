"""Benchmark harness: syslog-relay vs rsyslog and syslog-ng (see docs/benchmarks.md)."""
