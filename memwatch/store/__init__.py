"""The history: its schema, migrations and writes (history.py, standard library only), its runs read back with every evaluation's record replayed (runs.py), and safe file creation (files.py)."""
