"""Query-attack watch: near-copy detection of black-box attacks from the stream of queries (Blacklight-style)."""
