"""Experiment configs, one `get_config(arg)` per file, loaded by path with `--config=configs/<file>.py`."""
