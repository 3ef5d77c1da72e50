"""Generated constants (BOM and CRLF on purpose: normalised on ingest)."""
VERSION = "0.3.1"
