"""The jobs the CLI and the Python API run: embed, train, predict, evaluate, plot jobs."""
