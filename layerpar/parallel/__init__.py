"""Layout (who owns which branches), the process group, and the collectives (comm.py only)."""
