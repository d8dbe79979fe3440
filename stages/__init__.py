"""DVC stage entry points (`python -m stages.<name>`): read params.yaml, call femb, write the outs."""
