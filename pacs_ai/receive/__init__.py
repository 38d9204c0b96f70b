"""The C-STORE listener: an association's films checked and acknowledged once they are durable
in the spool and the queue."""
