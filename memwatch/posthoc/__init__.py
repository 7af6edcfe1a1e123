"""After training: checkpoint scans (scan.py), k/m/model-size sweeps (sweep.py), reports and comparisons (report.py), the memorization forecast (forecast.py)."""
