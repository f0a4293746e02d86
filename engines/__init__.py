"""Engine workers: one shared MDP worker runtime and small engine classes."""
