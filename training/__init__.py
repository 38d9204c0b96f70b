"""Training package: chest X-ray folders -> TorchScript model file for pacs_ai (see README)."""
