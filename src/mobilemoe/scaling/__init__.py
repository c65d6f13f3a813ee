"""The on-device scaling law: sweeps, fits, and the memory/compute-constrained planner."""
