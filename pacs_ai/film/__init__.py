"""A received file -> the model input: header filters, decode, display values."""
