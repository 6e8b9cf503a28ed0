"""Experiment configs; run one with `python launch.py --config=configs/NAME.py`."""
