"""What is durable: the job queue (SQLite), the spool's files, what is kept of them and for how
long, the destinations' latest C-ECHO."""
