"""Running as a service: systemd notifications and watchdog, Prometheus metrics, status."""
