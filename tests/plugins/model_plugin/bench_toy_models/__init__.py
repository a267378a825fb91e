"""Models defined only here (not in bnbench): see nets.py."""
