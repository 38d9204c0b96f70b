"""The DICOM SR (TID 1500) and the heat-map image made for a film, their UIDs, and reading a
report back."""
