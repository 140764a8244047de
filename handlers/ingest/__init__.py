"""Reading the exchange's sockets: WebSocket connections per batch of streams, the stamp
relays that read their sockets, and the inbox they feed."""
