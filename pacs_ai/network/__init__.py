"""DICOM networking both directions share: socket tuning, pynetdicom's internals behind one
door, peer addresses."""
