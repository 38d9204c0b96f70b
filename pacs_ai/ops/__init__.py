"""What an admin reads: metrics, health, the HTTP server and queue page, the audit trail, logs,
the drift watch."""
