"""Wire and file formats, pure functions over bytes, shared by the relay and the archiver:
RFC 5424 and RFC 3164, the routing fields, the loop guard's SD element and the staging
block."""
