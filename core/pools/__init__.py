"""Worker pools: how many workers each model version runs, starting and supervising their
processes (and preload templates), and when to restart one."""
