"""The terminal chat app, shipped inside the package as zkv_mlx.app."""
