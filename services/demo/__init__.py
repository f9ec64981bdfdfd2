"""`fleet demo`: demo data and live traffic through a running stack (see demo.py)."""
