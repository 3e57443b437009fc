"""Operations: metrics, snapshots, /metrics /health /status, status command, systemd,
logging, checks."""
