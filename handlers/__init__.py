"""Exchange side of the collector: WebSocket readers, REST snapshots, frame processing."""
