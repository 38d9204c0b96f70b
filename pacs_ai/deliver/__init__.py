"""Each report to its destinations: routing, the sender threads, one transport per kind
(C-STORE, STOW-RS, HL7 MLLP, FHIR), the periodic C-ECHO."""
