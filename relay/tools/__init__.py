"""Traffic generators for tests and benchmarks (``syslog-relay loadgen``)."""
