"""One unit per align method: `<name>.py` holds its config's trainer and step metrics; `units.py`
maps `align.method.name` to its unit, one `register` line per method."""
