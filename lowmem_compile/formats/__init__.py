"""Storage formats: NF4 weights (`nf4.py`) and 4/8-bit K/V (`kv4.py`)."""
