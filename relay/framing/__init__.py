"""RFC 6587 framing: the state machine and the fused hot path that frames a received chunk
and groups its messages into runs of one hour."""
