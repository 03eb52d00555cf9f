"""Metal kernel sources (*.metal, *.h), shipped inside the package as zkv_mlx.metal."""
