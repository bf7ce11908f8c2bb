"""Utilities: seeding, byte streaming, retries, top-n bookkeeping."""
