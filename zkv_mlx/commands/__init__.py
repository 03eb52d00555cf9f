"""One module per `zkv-mlx` verb, each with `run(args)`; `cli.py` imports only the one the user asked for."""
