"""`compare.py`'s parts: the plan of runs, running them, and the reports."""
