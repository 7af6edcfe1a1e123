"""After training: scans of saved checkpoints (scan.py) and the reports and comparisons built from a history (report.py)."""
