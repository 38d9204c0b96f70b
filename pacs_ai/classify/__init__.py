"""The worker threads: claim a batch, prepare its films in helper processes, assess them, write
the reports and queue their deliveries; the shadow model."""
