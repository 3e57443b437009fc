"""Forward outputs: spool -> peers over TCP, TLS or RELP; client TLS; TCP settlement."""
