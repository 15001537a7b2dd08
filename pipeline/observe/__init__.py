"""How a run is watched: progress bars, named Ray metrics and W&B runs."""
